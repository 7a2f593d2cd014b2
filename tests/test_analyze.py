"""`gapt analyze gates | attention | insertion` on tiny runs trained here, and the frozen-block cache."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from gapt.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_RUN = ("backbone=test_mae_tiny weights=null image_size=32 num_prompts=2 train.epochs=1 train.warmup_epochs=0 "
             "train.batch_size=32 data.num_workers=0 device=cpu data.format=shapes data.name=count "
             "data.num_samples=64").split()
DEPTH = 4  # test_mae_tiny


def train_run(path, *overrides):
    from gapt.config import load_config
    from gapt.engine.trainer import train
    train(load_config(None, SMALL_RUN + list(overrides) + [f"out={path}"]))
    return str(path)


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # gate_init=1 and a large lr: gates far from the default's ~0 and unequal after training
    gated = train_run(root / "gated", "method=gated", "learn_temperature=true", "gate_init=1", "train.lr=5")
    deep_t = train_run(root / "deep-temp", "method=vpt-deep", "learn_temperature=true")
    at3 = train_run(root / "plain-at3", "method=vpt-at-block", "insert_at_block=3")
    return {"gated": gated, "deep_temp": deep_t, "at3": at3}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


# -- gates ------------------------------------------------------------------------------------
def hand_selection_ratio(gate_logits):
    """SPEC §2: g_l = sigmoid(gamma_l), g~_l = g_l prod_{k>l}(1 - g_k), r_l = g~_l / sum_j g~_j."""
    g = [1.0 / (1.0 + math.exp(-x)) for x in gate_logits]
    weights = []
    for l in range(len(g)):
        w = g[l]
        for k in range(l + 1, len(g)):
            w *= 1.0 - g[k]
        weights.append(w)
    keep = 1.0
    for x in g:
        keep *= 1.0 - x
    return g, [w / sum(weights) for w in weights], keep


def test_gates_numbers_table_and_png(runs, tmp_path, capsys):
    from safetensors.torch import load_file
    out = tmp_path / "gates"
    assert main(["analyze", "gates", runs["gated"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert_png(out / "gates.png")

    tuned = load_file(f"{runs['gated']}/tuned.safetensors")
    gates, ratio, keep = hand_selection_ratio(tuned["gate_logits"].tolist())
    assert max(ratio) - min(ratio) > 1e-3  # trained gates differ, so the check below means something
    temps = tuned["temperature"].clamp(0.01, 10).tolist()

    saved = json.loads((out / "gates.json").read_text())["runs"][0]
    assert saved["label"] == "gated"
    assert saved["gate"] == pytest.approx(gates, rel=1e-6)
    assert saved["selection_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert sum(saved["selection_ratio"]) == pytest.approx(1.0)
    assert saved["inserted_prompt_weight"] == pytest.approx(keep, rel=1e-6)
    assert saved["temperature"] == pytest.approx(temps, rel=1e-6)

    table = (out / "gates.md").read_text()
    assert table == printed
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    for l in range(DEPTH - 1):  # block, gate, r_l, temperature: 4 significant digits
        cells = [c.strip() for c in rows[l]]
        assert cells[0] == str(l + 1)
        assert float(cells[1]) == pytest.approx(gates[l], rel=1e-3)
        assert float(cells[2]) == pytest.approx(ratio[l], rel=1e-3)
        assert float(cells[3]) == pytest.approx(temps[l], rel=1e-3)
    assert rows[DEPTH - 1][1].strip() == "—" and float(rows[DEPTH - 1][3]) == pytest.approx(temps[-1], rel=1e-3)
    assert float(rows[DEPTH][1]) == pytest.approx(keep, rel=1e-3)


def test_gates_side_by_side_and_temperature_only(runs, tmp_path):
    from gapt.analysis.gates import analyze_gates
    res = analyze_gates([runs["gated"], runs["deep_temp"]], tmp_path / "both")
    assert_png(res["png"])
    labels = [label for label, _ in res["entries"]]
    assert labels == ["gated", "deep-temp (no gates)"]
    deep = res["entries"][1][1]
    assert deep["gate"] == [] and len(deep["temperature"]) == DEPTH
    header = res["table"].splitlines()[0]
    assert "gated r_l" in header and "deep-temp (no gates) temperature" in header


def test_gates_errors_name_the_run(runs, tmp_path, capsys):
    assert main(["analyze", "gates", runs["gated"], runs["at3"], "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "plain-at3" in err and "vpt-at-block" in err
    assert main(["analyze", "gates", str(tmp_path / "nothing-here")]) == 1
    assert "nothing-here" in capsys.readouterr().err


def test_run_labels_disambiguate():
    from gapt.analysis.gates import run_labels
    assert run_labels(["/a/x/seed0", "/a/y/seed0", "/b/z"]) == ["x/seed0", "y/seed0", "b/z"]


# -- attention --------------------------------------------------------------------------------
def test_attention_maps_png_npz(runs, image_file, tmp_path):
    from gapt.analysis.attention import output_name
    out = tmp_path / "att"
    assert main(["analyze", "attention", runs["gated"], image_file, "--out", str(out)]) == 0
    name = output_name(image_file, "mean")
    assert_png(out / f"{name}.png")
    z = np.load(out / f"{name}.npz")
    z = {k.replace("run0_", "tuned_"): z[k] for k in z.files}
    grid = tuple(z["grid"])
    assert grid == (4, 4)
    for who in ("tuned", "frozen"):
        cls = z[f"{who}_cls"]
        assert cls.shape == (DEPTH, 16)
        assert (cls >= 0).all() and (cls.sum(1) <= 1 + 1e-6).all()
        rest = z[f"{who}_cls_to_prefix"] + (z["tuned_cls_to_prompts"] if who == "tuned" else 0)
        np.testing.assert_allclose(cls.sum(1) + rest, 1.0, atol=1e-5)
        assert z[f"{who}_cls_heads"].shape == (DEPTH, 2, 16)
        np.testing.assert_allclose(z[f"{who}_cls_heads"].mean(1), cls, atol=1e-6)
    assert (z["tuned_cls_to_prompts"] > 0).all()  # gated: prompts in every block
    prompts = z["tuned_prompts"]
    assert prompts.shape == (DEPTH, 16) and np.isfinite(prompts).all() and (prompts.sum(1) <= 1 + 1e-6).all()
    assert list(z["tuned_num_prompts"]) == [2] * DEPTH


def test_frozen_attention_is_the_plain_backbone(runs, image_file, tmp_path):
    """Block 1 of the frozen row, by hand: softmax(q k^T / sqrt(d)) of the backbone, CLS row, mean of heads."""
    from gapt.data import eval_transform
    from gapt.analysis.attention import _load_run_for_analysis, analyze_attention
    res = analyze_attention(runs["gated"], image_file, tmp_path / "att1", head=1)
    cfg, model, results = _load_run_for_analysis(runs["gated"])
    x = eval_transform(results["data"], cfg.image_size)(Image.open(image_file).convert("RGB"))[None]
    with torch.no_grad():
        blk = model.backbone.blocks[0]
        h = blk.norm1(model.embed(x))
        B, S, D = h.shape
        q, k, _ = blk.attn.qkv(h).reshape(B, S, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-2, -1) * (D // 2) ** -0.5).softmax(-1)[0]  # (heads, S, S)
    np.testing.assert_allclose(res["arrays"]["frozen_cls"][0], probs[1, 0, 1:].numpy(), atol=1e-5)
    assert res["arrays"]["run0_cls"].shape == (DEPTH, 16)


def test_attention_at_block_and_bad_head(runs, image_file, tmp_path, capsys):
    from gapt.analysis.attention import analyze_attention
    run = runs["at3"]
    res = analyze_attention(run, image_file, tmp_path / "a")
    a = res["arrays"]
    assert list(a["run0_num_prompts"]) == [0, 0, 2, 2]
    assert np.isnan(a["run0_prompts"][:2]).all() and np.isfinite(a["run0_prompts"][2:]).all()
    np.testing.assert_allclose(a["run0_cls"][:2], a["frozen_cls"][:2], atol=1e-6)  # nothing tuned before k
    assert_png(res["png"])
    assert main(["analyze", "attention", run, image_file, "--head", "7", "--out", str(tmp_path / "b")]) == 1
    assert "head" in capsys.readouterr().err


def test_attention_names_unique_per_image_path_and_head(runs, tmp_path, capsys):
    """issue 18: cat/0.png and dog/0.png, and two --head values, must not overwrite each other."""
    rng = np.random.default_rng(1)
    for animal in ("cat", "dog"):
        (tmp_path / "pics" / animal).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pics" / animal / "0.png")
    out = tmp_path / "out"
    cat, dog = str(tmp_path / "pics" / "cat" / "0.png"), str(tmp_path / "pics" / "dog" / "0.png")
    assert main(["analyze", "attention", runs["gated"], cat, "--out", str(out)]) == 0
    assert main(["analyze", "attention", runs["gated"], dog, "--out", str(out)]) == 0
    assert main(["analyze", "attention", runs["gated"], dog, "--head", "1", "--out", str(out)]) == 0
    npz = sorted(out.glob("*.npz"))
    assert len(npz) == 3 and len(list(out.glob("*.png"))) == 3
    images = sorted((str(np.load(f)["image"]), str(np.load(f)["head"])) for f in npz)
    assert images == sorted([(cat, "mean"), (dog, "mean"), (dog, "1")])
    # a folder of images is expanded as predict does: one figure per image under it
    out2 = tmp_path / "out2"
    assert main(["analyze", "attention", runs["gated"], str(tmp_path / "pics"), "--out", str(out2)]) == 0
    assert len(list(out2.glob("*.png"))) == 2
    # a folder without images says it is a folder, not "image not found"
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["analyze", "attention", runs["gated"], str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "folder" in err and "empty" in err and "image not found" not in err


def test_attention_rows_per_model_frozen_first(runs, image_file, tmp_path):
    """Fig. 5: frozen backbone first, then each run, at the chosen blocks; JSON holds the plotted rows."""
    from gapt.analysis.attention import output_name
    out = tmp_path / "fig5"
    assert main(["analyze", "attention", runs["gated"], runs["deep_temp"], image_file, "--blocks", "1,3",
                 "--out", str(out)]) == 0
    name = output_name(image_file, "mean")
    assert_png(out / f"{name}.png")
    z = np.load(out / f"{name}.npz")
    summary = json.loads((out / f"{name}.json").read_text())
    assert summary["blocks"] == [1, 3]
    labels = [r["label"] for r in summary["rows"]]
    assert labels[0].startswith("frozen test_mae_tiny") and len(labels) == 3  # one frozen row: one backbone
    assert labels[1].startswith("gated (gated+LT)") and labels[2].startswith("deep-temp (vpt-deep+LT)")
    for row, key in zip(summary["rows"], ("frozen", "run0", "run1")):
        assert row["cls_to_patches"] == pytest.approx([float(z[f"{key}_cls"][b - 1].sum()) for b in (1, 3)], abs=1e-6)
    # the gated run and vpt-deep differ from the frozen backbone and from each other
    assert not np.allclose(z["run0_cls"], z["frozen_cls"]) and not np.allclose(z["run0_cls"], z["run1_cls"])
    md = (out / f"{name}.md").read_text()
    assert md.count("| 3 |") == 3


# -- insertion sweep and the frozen-block cache------------------------------------------------
@pytest.mark.parametrize("learn_temperature", [False, True])
def test_training_from_the_frozen_cache_matches_training_from_images(learn_temperature, images):
    """What tests/test_model.py's logit check does not cover: *training* from the cache, as the insertion sweep
    does. For every k: the cache is timm's own blocks 1..k-1 run on the embedded images (none without
    frozen blocks: temperatures make every block trainable) and carries no gradient; one train-mode step
    from it (prompt dropout drawn from the same seed) gives the loss and the gradient of every tuned tensor
    that the full forward from the images gives."""
    labels = torch.tensor([0, 1, 2])
    for k in range(1, DEPTH + 1):
        model = tiny_model(method="vpt-at-block", insert_at_block=k, learn_temperature=learn_temperature,
                           prompt_dropout=0.5)
        frozen = 0 if learn_temperature else k - 1
        assert model.frozen_leading_blocks == frozen
        vit = model.backbone
        with torch.no_grad():
            cache = model.frozen_features(images)
            reference = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
            for block in vit.blocks[:frozen]:
                reference = block(reference)
        torch.testing.assert_close(cache, reference, atol=1e-6, rtol=1e-6)
        steps = []
        for forward, inputs in ((model, images), (model.forward_from_frozen, cache)):
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(11)
            loss = torch.nn.functional.cross_entropy(forward(inputs), labels)
            loss.backward()
            steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.tuned_parameters().items()}))
            assert not cache.requires_grad and cache.grad is None
        (loss_full, grads_full), (loss_cached, grads_cached) = steps
        torch.testing.assert_close(loss_cached, loss_full, atol=1e-6, rtol=1e-6)
        assert set(grads_full) == set(grads_cached) and "prompt_embeddings" in "".join(grads_full)
        assert all(float(g.abs().sum()) > 0 for n, g in grads_full.items() if "prompt" in n)
        for name in grads_full:
            torch.testing.assert_close(grads_cached[name], grads_full[name], atol=1e-6, rtol=1e-5, msg=name)


def test_insertion_sweep(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["analyze", "insertion", *SMALL_RUN, f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert_png(out / "insertion.png")
    summary = json.loads((out / "insertion.json").read_text())
    rows = summary["runs"]
    assert [r["block"] for r in rows] == list(range(1, DEPTH + 1))
    for r in rows:
        results = json.loads((out / f"insert_{r['block']}" / "results.json").read_text())
        assert results["method"] == "vpt-at-block" and results["insert_at_block"] == r["block"]
        assert r["test_top1"] == results["metrics"]["test_top1"]
        assert r["status"] == "trained"
        # the engine computed blocks 1..k-1 once (un-augmented data), so run k trains blocks k..L only
        assert r["frozen_cache_blocks"] == r["block"] - 1
    assert "| 3 |" in printed and "cached frozen blocks" in printed

    # a second sweep skips finished runs and keeps what the first one saw of the cache
    from gapt.config import load_config
    from gapt.analysis.insertion import insertion_sweep

    class NoTraining:
        def run(self, jobs, on_start, on_end, early_stop=False):
            assert not jobs, "a finished run was trained again"
    again = insertion_sweep(load_config(None, SMALL_RUN + [f"out={out}"]), executor=NoTraining())
    assert [r["status"] for r in again["runs"]] == ["skipped (finished)"] * DEPTH
    assert [r["frozen_cache_blocks"] for r in again["runs"]] == [0, 1, 2, 3]

    # the same folder with another config is an error naming the key
    with pytest.raises(ValueError, match="num_prompts"):
        insertion_sweep(load_config(None, SMALL_RUN + [f"out={out}", "num_prompts=3"]), blocks=[2])


def test_insertion_sweep_resumes_unfinished(tmp_path):
    from gapt.config import load_config
    from gapt.engine.trainer import train
    from gapt.analysis.insertion import insertion_config, insertion_sweep
    cfg = load_config(None, SMALL_RUN + ["train.epochs=2", f"out={tmp_path / 's'}"])
    train(insertion_config(cfg, 4), stop_after_epoch=0)  # as if killed after epoch 0
    summary = insertion_sweep(cfg, blocks=[4])
    (row,) = summary["runs"]
    assert row["status"] == "resumed" and row["frozen_cache_blocks"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "s" / "insert_4" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    with pytest.raises(ValueError, match="blocks 1..4"):
        insertion_sweep(cfg, blocks=[5])


def test_parse_blocks():
    from gapt.analysis.commands import parse_blocks
    assert parse_blocks("1,2,5") == [1, 2, 5]
    assert parse_blocks("3-5, 1") == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="--blocks"):
        parse_blocks("two")


def test_frozen_counterpart_backbone():
    """Prompt methods share the tuned model's frozen backbone; a full fine-tune gets the pretrained one rebuilt."""
    from gapt.config import load_config
    from gapt.analysis.attention import _frozen_counterpart
    cfg = load_config(None, SMALL_RUN + ["method=full"])
    gated = tiny_model(method="gated")
    frozen = _frozen_counterpart(cfg, gated)
    assert frozen.backbone is gated.backbone and frozen.num_prompts == 0 and frozen.temperature is None
    full = tiny_model(method="full")
    frozen = _frozen_counterpart(cfg, full)
    assert frozen.backbone is not full.backbone and frozen.method == "linear"
    rebuilt = _frozen_counterpart(cfg, full)  # weights: null -> the backbone seeded by train.seed, every time
    for a, b in zip(frozen.backbone.state_dict().values(), rebuilt.backbone.state_dict().values()):
        assert torch.equal(a, b)


def test_insertion_several_backbones_on_one_plot(tmp_path, capsys):
    """Fig. 1: one curve per backbone, each with its own weights and lr; JSON rows are the runs' results."""
    out = tmp_path / "fig1"
    assert main(["analyze", "insertion", "--blocks", "1,4", "--backbone", "test_mae_tiny", "--weights", "null",
                 "--lr", "0.1", "--backbone", "test_moco_tiny", "--weights", "null", "--lr", "1.0",
                 *SMALL_RUN, f"out={out}"]) == 0
    assert_png(out / "insertion.png")
    summary = json.loads((out / "insertion.json").read_text())
    assert [c["backbone"] for c in summary["curves"]] == ["test_mae_tiny", "test_moco_tiny"]
    for curve, lr in zip(summary["curves"], (0.1, 1.0)):
        assert curve["lr"] == lr and [r["block"] for r in curve["runs"]] == [1, 4]
        for r in curve["runs"]:
            res = json.loads((out / curve["backbone"] / f"insert_{r['block']}" / "results.json").read_text())
            assert res["backbone"] == curve["backbone"] and res["lr"] == lr and res["insert_at_block"] == r["block"]
            assert r["test_top1"] == res["metrics"]["test_top1"]
    assert "### test_moco_tiny (lr 1.0)" in capsys.readouterr().out
    # --weights / --lr must pair with --backbone
    assert main(["analyze", "insertion", "--backbone", "test_mae_tiny", "--lr", "0.1", "--lr", "0.2",
                 *SMALL_RUN, f"out={out}"]) == 1
    assert "--lr given 2 time(s) for 1 --backbone" in capsys.readouterr().err


def test_attention_frozen_counterpart_strips_lora_and_reloads_bitfit(tmp_path):
    """The 'frozen backbone' row of `gapt analyze attention` is the pretrained ViT: LoRA's update and
    BitFit's trained biases must not leak into it (compared with a plain linear model on the same weights)."""
    import torch
    from types import SimpleNamespace
    from gapt import build_model
    from gapt.analysis.attention import _frozen_counterpart
    images = torch.randn(2, 3, 32, 32)
    plain = build_model("test_mae_tiny", method="linear", num_classes=3, weights=None, random_seed=0).eval()
    cfg = SimpleNamespace(backbone="test_mae_tiny", weights=None, image_size=32, train=SimpleNamespace(seed=0))
    for method in ("lora", "bitfit"):
        tuned = build_model("test_mae_tiny", method=method, num_classes=3, weights=None, random_seed=0).eval()
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if p.requires_grad and not n.startswith("head"):
                    p.add_(0.5)  # a trained update that changes the attention
            frozen = _frozen_counterpart(cfg, tuned)
            want = [m for m in plain.attention_maps(images)]
            got = [m for m in frozen.attention_maps(images)]
            changed = [m for m in tuned.attention_maps(images)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got)), method
        assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, changed)), method
