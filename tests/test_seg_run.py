"""`gapt seg train | eval | predict` end to end on a tiny ViT (test_mae_tiny: patch 8, width 32, 4 blocks)
and a tiny ADE20K-layout fixture (48x40 images). The heads are narrowed from SETR's 256 channels
to 16 (``gapt.seg.train.HEAD_CHANNELS``) so the whole file runs in well under a minute on 2 cores."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import gapt.seg.model as seg_model
import gapt.seg.recipe as seg_recipe
import gapt.seg.train as seg_train
from gapt.cli import main
from gapt.config import load_config
from gapt.engine.run import seed_everything
from gapt.engine.runfolder import read_metrics
from gapt.report.tables import build_report, collect_runs
from gapt.seg.evaluate import evaluate_seg, load_seg_run
from gapt.seg.model import aux_blocks_for_depth, backbone_checksum, build_seg_model
from gapt.seg.recipe import seg_dataset, slide_stride, train_scale
from gapt.seg.train import poly_lr, train_seg

H, W = 48, 40
COLOURS = {0: (0, 0, 0), 1: (200, 40, 40), 2: (40, 200, 40), 3: (40, 40, 200)}


def _pair(seed):
    """Raw ADE20K-style mask (0 = ignore, classes 1..3) and an image whose colours follow it."""
    rng = np.random.default_rng(seed)
    mask = np.full((H, W), 1, np.uint8)
    split_row, split_col = int(rng.integers(16, 32)), int(rng.integers(12, 28))
    mask[split_row:, :split_col] = 2
    mask[:, split_col:] = 3
    mask[:3, :3] = 0
    image = np.zeros((H, W, 3), np.int64)
    for k, c in COLOURS.items():
        image[mask == k] = c
    image = np.clip(image + rng.integers(-25, 25, image.shape), 0, 255).astype(np.uint8)
    return image, mask


def write_ade(root, n_train=4, n_val=2):
    for split, n, base in (("training", n_train, 0), ("validation", n_val, 100)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = _pair(base + i)
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def overrides(root, out, **extra):
    kv = {"backbone": "test_mae_tiny", "weights": "null", "method": "gated", "num_prompts": 4, "gate_init": 10,
          "seg.crop_size": 32, "train.batch_size": 2, "seg.iterations": 4, "seg.eval_every": 2, "train.lr": 0.01,
          "seg.min_lr": 0.0001, "data.format": "ade20k", "data.root": str(root), "data.num_workers": 0,
          "device": "cpu", "out": str(out)}
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, and a busy machine makes it wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def narrow_heads():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seg_train, "HEAD_CHANNELS", 16)
        yield


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade(tmp_path_factory.mktemp("data") / "ade")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ade_root, narrow_heads):
    """One CLI training run (4 iterations, val every 2, multi-scale at the end)."""
    out = tmp_path_factory.mktemp("runs") / "ade-gated"
    assert main(["seg", "train", *overrides(ade_root, out, learn_temperature="true"), "--multi-scale"]) == 0
    return out


# -- recipe values ----------------------------------------------------------------------------------
def test_recipe_values():
    assert aux_blocks_for_depth(12) == (5, 9)
    assert aux_blocks_for_depth(4) == (2, 3)
    assert aux_blocks_for_depth(24) == (10, 18)
    assert aux_blocks_for_depth(1) == (1,)
    assert slide_stride(512) == 341 and train_scale(512) == (2048, 512)
    assert poly_lr(0.01, 0, 100, 0.9, 1e-4) == pytest.approx(0.01)
    assert poly_lr(0.01, 100, 100, 0.9, 1e-4) == pytest.approx(1e-4)
    assert poly_lr(0.01, 50, 100, 0.9, 1e-4) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)


@pytest.mark.parametrize("name", ["mae_vitb16", "mocov3_vitb16"])
def test_presets_follow_spec(name):
    import gapt
    cfg = load_config(str(Path(gapt.__file__).parent / "configs" / "ade20k" / f"{name}.yaml"))
    t, sg = cfg.train, cfg.seg
    assert (cfg.backbone, cfg.method, cfg.num_prompts, cfg.gate_init, sg.crop_size) == (name, "gated", 100, 10, 512)
    assert (t.batch_size, t.lr, sg.head_lr_mult, sg.poly_power, sg.min_lr, sg.iterations) == (16, 0.001, 10, 0.9,
                                                                                               1e-4, 160000)
    assert (t.optimizer, t.momentum, t.weight_decay, cfg.data.format) == ("sgd", 0.9, 0.0, "ade20k")
    assert sg.sincos_pos_embed == "interpolate"  # MMSegmentation's: the checkpoint's table resized bilinearly


# -- train -> eval -> predict through the CLI ----------------------------------------------------------
def test_run_folder(trained_run):
    for f in ("config.yaml", "metrics.jsonl", "results.json", "tuned.safetensors", "last.pt", "eval_val.json"):
        assert (trained_run / f).is_file(), f
    lines = read_metrics(trained_run)
    assert [r["iteration"] for r in lines] == [2, 4]  # log interval 50: the evaluations
    for r in lines:
        assert {"iteration", "loss", "lr", "images_per_s", "mIoU", "mAcc", "aAcc"} <= set(r)
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0
    assert lines[0]["lr"] == pytest.approx(poly_lr(0.01, 1, 4, 0.9, 1e-4))
    res = json.loads((trained_run / "results.json").read_text())
    assert res["benchmark"] == "ade20k" and res["task"] == "ade20k" and res["final"] is True
    assert (res["backbone"], res["method"], res["learn_temperature"], res["num_prompts"], res["seed"]) == \
        ("test_mae_tiny", "gated", True, 4, 42)
    assert set(res["metrics"]) == {"mIoU", "mAcc", "aAcc", "mIoU_ms", "mAcc_ms", "aAcc_ms"}
    assert res["metrics"]["mIoU"] == pytest.approx(lines[-1]["mIoU"])
    assert res["aux_blocks"] == [2, 3] and res["crop_size"] == 32
    per_class = json.loads((trained_run / "eval_val.json").read_text())["single_scale"]["per_class"]
    assert len(per_class) == 150 and per_class[0]["class"] == "wall"

    tensors = load_file(str(trained_run / "tuned.safetensors"))
    enc = {k for k in tensors if k.startswith("encoder.")}
    assert enc == {"encoder.prompt_embeddings", "encoder.gate_logits", "encoder.temperature"}
    assert all(k.startswith(("encoder.", "decode_head.", "aux_heads.2.", "aux_heads.3.")) for k in tensors)
    assert tensors["decode_head.conv_seg.weight"].shape == (150, 16, 1, 1)
    with safe_open(str(trained_run / "tuned.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "gapt-seg-tuned" and json.loads(meta["config"])["crop_size"] == 32


def test_eval_reproduces_training_metrics(trained_run, capsys):
    before = json.loads((trained_run / "results.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["seg", "eval", str(trained_run), "--multi-scale", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the run is rebuilt from config.yaml + tuned.safetensors (random backbone from the seed)
    for k in ("mIoU", "mAcc", "aAcc", "mIoU_ms", "mAcc_ms", "aAcc_ms"):
        assert out[k] == pytest.approx(before[k]), k
    assert out["images"] == 2 and len(out["per_class"]) == 150
    after = json.loads((trained_run / "results.json").read_text())["metrics"]
    assert set(after) == set(before)
    saved = json.loads((trained_run / "eval_val.json").read_text())
    assert set(saved) >= {"split", "single_scale", "multi_scale"}


def test_a_run_saved_before_the_seg_section_still_resumes_and_evaluates(trained_run, ade_root, tmp_path, capsys):
    """config.yaml of the layout before `seg:` (train.iterations ... train.min_lr, top-level crop_size)."""
    import shutil
    from gapt.engine.run import config_for_resume
    old = shutil.copytree(trained_run, tmp_path / "old")
    (old / "config.yaml").write_text(
        "backbone: test_mae_tiny\nweights: null\nmethod: gated\nnum_prompts: 4\ngate_init: 10\n"
        "learn_temperature: true\nimage_size: 224\ncrop_size: 32\n"
        f"data:\n  format: ade20k\n  root: {ade_root}\n  num_workers: 0\n"
        "train:\n  batch_size: 2\n  lr: 0.01\n  iterations: 4\n  eval_every: 2\n  head_lr_mult: 10.0\n"
        "  poly_power: 0.9\n  min_lr: 0.0001\n"
        f"out: {trained_run}\ndevice: cpu\n")
    cfg = config_for_resume(str(old))
    assert (cfg.seg.iterations, cfg.seg.eval_every, cfg.seg.crop_size, cfg.seg.min_lr, cfg.out) == \
        (4, 2, 32, 1e-4, str(old))
    before = json.loads((trained_run / "results.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["seg", "eval", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(before["mIoU"])
    assert main(["seg", "train", "--resume", str(old)]) == 0  # finished: says so, trains nothing
    assert json.loads((old / "results.json").read_text())["metrics"] == before


def test_eval_with_the_dataset_elsewhere(trained_run, ade_root, tmp_path, capsys):
    import shutil
    moved = shutil.copytree(ade_root, tmp_path / "ade_moved")
    before = json.loads((trained_run / "results.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["seg", "eval", str(trained_run), "--data-root", str(moved), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(before["mIoU"])
    assert main(["seg", "eval", str(trained_run), "--data-root", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["seg", "eval", str(trained_run)]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_predict_writes_masks_and_overlays(trained_run, ade_root, tmp_path, capsys):
    img = ade_root / "images" / "validation" / "ADE_validation_00000000.jpg"
    out = tmp_path / "pred"
    assert main(["seg", "predict", str(trained_run), str(img), "--out", str(out), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 1 and preds[0]["classes"]
    mask = Image.open(out / "ADE_validation_00000000_mask.png")
    overlay = Image.open(out / "ADE_validation_00000000_overlay.png")
    assert mask.mode == "P" and mask.size == (W, H)
    assert overlay.mode == "RGB" and overlay.size == (W, H)
    assert np.array(mask).max() < 150
    assert main(["seg", "predict", str(trained_run), str(tmp_path / "missing.jpg")]) == 1
    # a folder: every image in it
    assert main(["seg", "predict", str(trained_run), str(ade_root / "images" / "validation"), "--out",
                 str(tmp_path / "all"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [Path(p["image"]).name for p in preds] == sorted(
        f.name for f in (ade_root / "images" / "validation").iterdir())


def test_report_shows_paper_number(trained_run, tmp_path, capsys):
    for backbone, method, temp, ss, ms in (("mae_vitb16", "gated", False, 38.44, 39.81),
                                           ("mocov3_vitb16", "vpt-deep", False, 35.50, 37.15)):
        run = tmp_path / f"{backbone}-{method}"
        run.mkdir()
        res = json.loads((trained_run / "results.json").read_text())
        res.update(backbone=backbone, method=method, learn_temperature=temp, num_prompts=100)  # Table 3's count
        (run / "results.json").write_text(json.dumps(res))
    report = build_report(collect_runs(tmp_path))
    other = dict(res, backbone="mae_vitb16", method="gated", learn_temperature=False, num_prompts=4)
    assert build_report([other]).task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU")["paper"] is None
    row = report.task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU")
    assert row["paper"] == 38.44 and row["mean"] == pytest.approx(res["metrics"]["mIoU"])
    assert report.task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU_ms")["paper"] == 39.81
    assert report.task("ade20k", "mocov3_vitb16", "vpt-deep", "ade20k", metric="mIoU")["paper"] == 35.50
    assert "38.44" in report.markdown()
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "reports")]) == 0
    md = capsys.readouterr().out
    assert "ADE20K" in md and "38.44" in md and "39.81" in md and "35.50" in md


# -- what trains, resume, data parallel evaluation -----------------------------------------------------
def test_only_prompts_gates_temperatures_and_heads_change(ade_root, tmp_path, narrow_heads):
    # gate_init=0: the first updates of a gate logit are far below float32 resolution at -10
    cfg = load_config(None, overrides(ade_root, tmp_path / "run", learn_temperature="true", gate_init=0))
    seed_everything(cfg.train.seed)
    fresh = build_seg_model(cfg, 150)
    train_seg(cfg)
    trained, meta = seg_model.load_seg_model(tmp_path / "run" / "tuned.safetensors", cfg)
    assert meta["backbone_checksum"] == backbone_checksum(fresh)
    before, after = fresh.state_dict(), trained.state_dict()
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(not k.startswith("encoder.backbone.") for k in changed)
    for k in ("encoder.prompt_embeddings", "encoder.gate_logits", "decode_head.conv_seg.weight",
              "aux_heads.2.conv_seg.weight", "decode_head.up_convs.0.1.running_mean"):
        assert k in changed, k
    assert not any(k.startswith("encoder.head") for k in after)  # the classification head is gone
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert "encoder.temperature" in trainable  # its updates here are below float32 resolution at 1.0
    assert all(n.startswith(("encoder.prompt_embeddings", "encoder.gate_logits", "encoder.temperature",
                             "decode_head.", "aux_heads.")) for n in trainable)
    optimised = {id(p) for g in seg_train.make_seg_optimizer(cfg, trained).param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in trained.named_parameters() if n in trainable}


def test_resume_equals_uninterrupted(ade_root, tmp_path, narrow_heads):
    extra = dict(method="vpt-deep", learn_temperature="true", **{"seg.iterations": 4, "seg.eval_every": 0})
    full, split = tmp_path / "full", tmp_path / "split"
    train_seg(load_config(None, overrides(ade_root, full, **extra)), log_every=2)
    # stop mid-pass (2 steps a pass) and mid-log-interval, then continue through the CLI
    stopped = train_seg(load_config(None, overrides(ade_root, split, **extra)), log_every=2, stop_after=3)
    assert stopped == {"stopped_after": 3}
    assert not (split / "results.json").exists()
    assert main(["seg", "train", "--resume", str(split)]) == 0

    a, b = load_file(str(full / "tuned.safetensors")), load_file(str(split / "tuned.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def strip(records):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]
    assert [r["iteration"] for r in read_metrics(full)] == [2, 4]
    assert strip(read_metrics(full)) == strip(read_metrics(split))
    ra = json.loads((full / "results.json").read_text())
    rb = json.loads((split / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]
    with pytest.raises(SystemExit, match="drop --config"):
        main(["seg", "train", "--resume", str(split), "train.lr=1"])


def test_moco_sincos_table_is_recorded_and_kept(trained_run, ade_root, tmp_path, narrow_heads, capsys):
    """results.json records seg.sincos_pos_embed (null for a backbone without a sin-cos table); eval rebuilds
    the same table; a run whose resume file predates the key resumes on the rebuilt table it trained on."""
    from gapt.model.backbones import sincos_pos_embed_2d
    assert json.loads((trained_run / "results.json").read_text())["sincos_pos_embed"] is None
    extra = {"backbone": "test_moco_tiny", "seg.iterations": 2, "seg.eval_every": 0, "seg.crop_size": 48}
    for mode in ("interpolate", "rebuild"):
        out = tmp_path / mode
        assert main(["seg", "train", *overrides(ade_root, out, **extra, **{"seg.sincos_pos_embed": mode})]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["sincos_pos_embed"] == mode and res["pos_embed_interpolation"] == "bilinear"
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a backbone other than the trained one would warn
            assert main(["seg", "eval", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(res["metrics"]["mIoU"])
    _, model, _ = load_seg_run(str(tmp_path / "rebuild"))
    assert torch.equal(model.encoder.backbone.pos_embed, sincos_pos_embed_2d(6, 6, 32))  # 48 px crop, patch 8

    # an interrupted run from before the key: config.yaml without it, a resume file without it
    old = tmp_path / "old"
    assert train_seg(load_config(None, overrides(ade_root, old, **extra, **{"seg.sincos_pos_embed": "rebuild"})),
                     stop_after=1) == {"stopped_after": 1}
    text = (old / "config.yaml").read_text()
    assert "sincos_pos_embed: rebuild" in text
    (old / "config.yaml").write_text(text.replace("  sincos_pos_embed: rebuild\n", ""))
    state = torch.load(old / "last.pt", weights_only=True)
    del state["sincos_pos_embed"]
    torch.save(state, old / "last.pt")
    assert main(["seg", "train", "--resume", str(old)]) == 0
    assert json.loads((old / "results.json").read_text())["sincos_pos_embed"] == "rebuild"
    a, b = load_file(str(old / "tuned.safetensors")), load_file(str(tmp_path / "rebuild" / "tuned.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training as the uninterrupted rebuild run
    c = load_file(str(tmp_path / "interpolate" / "tuned.safetensors"))
    assert not torch.equal(a["encoder.prompt_embeddings"], c["encoder.prompt_embeddings"])  # which the test can tell


def test_eval_shards_count_every_image_once(trained_run, ade_root, monkeypatch):
    """Two processes' shards (rank::world) sum to the single-process confusion matrix."""
    import gapt.engine.distributed as dist
    import gapt.seg.evaluate as ev
    cfg, model, _ = load_seg_run(str(trained_run))
    train_images = seg_dataset(cfg, "train", seg_recipe.eval_pipeline(cfg.seg.crop_size))  # 4 images: 2 per rank
    captured = []
    monkeypatch.setattr(ev, "reduce_confusion", lambda cm: captured.append(cm.clone()) or cm)
    whole = evaluate_seg(model, train_images, cfg.seg.crop_size, torch.device("cpu"))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        evaluate_seg(model, train_images, cfg.seg.crop_size, torch.device("cpu"))
    assert torch.equal(captured[1] + captured[2], captured[0])
    assert captured[1].sum() > 0 and captured[2].sum() > 0
    assert not np.isnan(whole.miou) and whole.iou.shape == (150,)


# -- errors and other data ------------------------------------------------------------------------------
def test_config_errors_are_named(ade_root, tmp_path, capsys):
    assert main(["seg", "train", *overrides(ade_root, tmp_path / "a", **{"data.format": "fgvc"})]) == 1
    assert "data.format" in capsys.readouterr().err
    assert main(["seg", "train", *overrides(ade_root, tmp_path / "b", **{"seg.iterations": 0})]) == 1
    assert "seg.iterations" in capsys.readouterr().err
    assert main(["seg", "train", *overrides(tmp_path / "nowhere", tmp_path / "c")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["seg", "eval", str(tmp_path)]) == 1
    assert "not a gapt run folder" in capsys.readouterr().err


def test_seg_folder_format(tmp_path, narrow_heads):
    root = tmp_path / "streets"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            image, mask = _pair(7 + i)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            labels = np.where(mask == 0, 255, mask - 1).astype(np.uint8)
            Image.fromarray(labels).save(root / "masks" / split / f"{i}.png")
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    out = tmp_path / "run"
    args = overrides(root, out, **{"data.format": "seg_folder", "seg.iterations": 2, "seg.eval_every": 0})
    assert main(["seg", "train", *args]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "seg_folder" and res["task"] == "streets"
    assert res["data"]["num_classes"] == 3 and set(res["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    per_class = json.loads((out / "eval_val.json").read_text())["single_scale"]["per_class"]
    assert [c["class"] for c in per_class] == ["road", "car", "sky"]


@pytest.mark.parametrize("method,extra", [("linear", {}), ("full", {}), ("vpt-shallow", {}),
                                          ("vpt-deep", {"learn_temperature": "true"}),
                                          ("vpt-at-block", {"insert_at_block": 3, "learn_temperature": "true"}),
                                          ("gated", {"learn_temperature": "true"})])
def test_every_method_segments(method, extra):
    """Each transfer method feeds the heads (aux blocks 2, 3 of 4; vpt@3's block 2 has no prompts yet)."""
    from gapt.seg import seg_loss
    cfg = load_config(None, [f"method={method}", "backbone=test_moco_tiny", "seg.crop_size=32", "num_prompts=3",
                             *[f"{k}={v}" for k, v in extra.items()]])
    model = build_seg_model(cfg, 150, channels=8).train()
    x, y = torch.randn(2, 3, 40, 24), torch.randint(0, 150, (2, 40, 24))
    seg_loss(model(x), y).backward()
    tuned = [n for n, p in model.encoder.named_parameters() if p.requires_grad]
    assert all(model.encoder.get_parameter(n).grad is not None for n in tuned)
    assert model.eval()(x).shape == (2, 150, 40, 24)
    state = seg_model.seg_tuned_state(model)
    assert not any(k.startswith("encoder.head") for k in state)
    assert {k[len("encoder."):] for k in state if k.startswith("encoder.")} == set(tuned)


DDP_SEG_SCRIPT = r"""
import os, sys
import gapt.seg.train as T
from gapt.config import load_config
from gapt.engine.run import TrainingDiverged
nan_at = int(sys.argv[2])
import gapt.seg.evaluate as E
real_reduce = E.reduce_confusion
def reduce_confusion(cm):  # record each evaluation's summed confusion matrix: its pixel count
    out = real_reduce(cm)
    with open(sys.argv[1] + ".pixels" + os.environ["RANK"], "a") as f:
        f.write(f"{int(cm.sum())} {int(out.sum())}\n")
    return out
E.reduce_confusion = reduce_confusion
if os.environ["RANK"] == "1" and nan_at >= 0:  # only this process sees a non-finite loss
    real, calls = T.seg_loss, []
    def seg_loss(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == nan_at + 1 else out
    T.seg_loss = seg_loss
try:
    print("results", T.train_seg(load_config(None, sys.argv[3:] + ["out=" + sys.argv[1]])), flush=True)
except TrainingDiverged as e:
    with open(sys.argv[1] + ".rank" + os.environ["RANK"], "w") as f:  # one file per process: no interleaving
        f.write(f"diverged: {e}")
    sys.exit(3)
"""


@pytest.mark.parametrize("nan_at", [-1, 2])
def test_ddp_two_processes(tmp_path, nan_at):
    """torchrun with 2 gloo processes: a run finishes with every val image counted once; a non-finite loss
    in one process stops both at the same iteration."""
    root = write_ade(tmp_path / "ade", n_train=4, n_val=3)
    script = tmp_path / "ddp_seg.py"
    script.write_text(DDP_SEG_SCRIPT)
    over = [o for o in overrides(root, tmp_path / "unused", backbone="mae_vit_micro") if not o.startswith("out=")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29519", str(script), str(tmp_path / "run"), str(nan_at), *over],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    if nan_at < 0:
        assert r.returncode == 0, out[-3000:]
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["world_size"] == 2 and results["metrics"]["mIoU"] is not None
        # every labelled val pixel counted once: raw ADE20K label 0 is ignored, the rest is labelled
        labelled = sum(int((np.array(Image.open(p)) != 0).sum()) for p in (root / "annotations" / "validation").iterdir())
        counts = [[tuple(map(int, line.split())) for line in (tmp_path / f"run.pixels{r}").read_text().splitlines()]
                  for r in (0, 1)]
        assert len(counts[0]) == len(counts[1]) >= 1
        for (own0, total0), (own1, total1) in zip(*counts):
            assert total0 == total1 == own0 + own1 == labelled and own0 > 0 and own1 > 0
    else:
        assert r.returncode != 0
        said = [(tmp_path / f"run.rank{rank}").read_text() if (tmp_path / f"run.rank{rank}").exists() else out[-2000:]
                for rank in (0, 1)]
        assert said[1].startswith("diverged: loss is nan at iteration 2; stopped"), said[1]
        assert said[0].startswith("diverged: the loss is not finite in another process at iteration 2"), said[0]
