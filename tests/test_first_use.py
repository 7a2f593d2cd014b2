"""Issue 11, "what a new user meets first": each defect found by using gapt as a newcomer
would, with the test that now guards it (MoCo v3 sin-cos grid, seg default format, warm-up
default, `analyze gates` on segmentation runs)."""
import json
import math
import warnings

import pytest
import torch

from gapt import build_model
from gapt.cli import main
from gapt.model.backbones import BACKBONES, BackboneSpec, create_vit, register_backbone

# A one-block ViT with MoCo v3's patch 16, so 224 / 384 / 512 give MoCo's own 14 / 24 / 32 grids.
register_backbone(BackboneSpec("test_moco_p16", dict(patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                                     qkv_bias=True),
                               pooling="cls", checkpoint_format="mocov3", image_size=224, sincos_pos_embed=True))


def moco_v3_sincos(h, w, dim, temperature=10000.0):
    """Transcribed from MoCo v3's vits.py (build_2d_sincos_position_embedding), torch's default
    meshgrid ('ij') with grid_w first, exactly as there; (1, 1 + h*w, dim) with a zero CLS row."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when meshgrid's indexing is left implicit
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h)
    pos_dim = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), pos], dim=1)


# -- 1. MoCo v3's position embedding at 224, 384 and 512 ------------------------------------
def test_moco_sincos_transcription_is_rows_first():
    # the transcription itself, on a 2x2 grid: token 1 (row 0, col 1) has out_w = 0, out_h = 1
    pe = moco_v3_sincos(2, 2, 4)[0, 1:]
    assert torch.allclose(pe[1], torch.tensor([0.0, 1.0, torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))]))
    assert torch.allclose(pe[2], torch.tensor([torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0)), 0.0, 1.0]))


def test_moco_position_embedding_at_224_384_512(tmp_path):
    # a MoCo v3 pre-training file (module.base_encoder.*) whose pos_embed is MoCo's own at 224
    torch.manual_seed(0)
    vit = create_vit(BACKBONES["test_moco_p16"])
    sd = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    sd["pos_embed"] = moco_v3_sincos(14, 14, 32)
    path = tmp_path / "vit-tiny-300ep.pth.tar"
    torch.save({"epoch": 300, "state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}, path)

    def pos(image_size, weights):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_model("test_moco_p16", method="vpt-shallow", num_prompts=2, num_classes=3,
                               weights=weights, image_size=image_size).backbone.pos_embed.detach()

    assert torch.equal(pos(224, str(path)), sd["pos_embed"])           # the checkpoint's own
    assert torch.allclose(pos(224, None), sd["pos_embed"], atol=1e-6)   # rebuilt = the checkpoint's
    for size, grid in [(384, 24), (512, 32)]:
        assert torch.allclose(pos(size, str(path)), moco_v3_sincos(grid, grid, 32), atol=1e-5), size
    # the registered MoCo backbones build the same grid
    vits = create_vit(BACKBONES["mocov3_vits16"], image_size=384)
    assert torch.allclose(vits.pos_embed.detach(), moco_v3_sincos(24, 24, 384), atol=1e-5)


# -- 3. train.warmup_epochs defaults to auto = round(epochs / 10) ---------------------------
SHORT = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "train.batch_size=32",
         "data.format=shapes", "data.name=count", "data.num_samples=64", "data.num_workers=0", "device=cpu"]


@pytest.mark.parametrize("epochs, warmup", [(1, 0), (2, 0), (4, 0), (5, 1), (14, 1), (15, 2), (100, 10), (150, 15)])
def test_auto_warmup_is_a_tenth_of_the_epochs(epochs, warmup):
    from gapt.config import load_config, warmup_epochs
    cfg = load_config(None, [f"train.epochs={epochs}"])
    assert cfg.train.warmup_epochs == "auto" and warmup_epochs(cfg.train) == warmup
    explicit = load_config(None, [f"train.epochs={epochs}", f"train.warmup_epochs={min(3, epochs)}"])
    assert warmup_epochs(explicit.train) == min(3, epochs)


def test_explicit_warmup_is_still_checked(capsys):
    from gapt.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"'train\.warmup_epochs': 3 .*train\.epochs=2"):
        load_config(None, ["train.epochs=2", "train.warmup_epochs=3"])
    for bad in ("soon", "-1", "true"):
        with pytest.raises(ConfigError, match=r"train\.warmup_epochs"):
            load_config(None, ["train.epochs=2", f"train.warmup_epochs={bad}"])
    assert main(["keys"]) == 0
    assert "train.warmup_epochs = 'auto'" in capsys.readouterr().out


def test_short_train_and_sweep_need_no_warmup_override(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SHORT, "train.epochs=2", "train.lr=0.3", f"out={run}"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    # no warm-up: each line's lr (the epoch's last step; 2 steps of 32 of 64 images) is the plain
    # cosine over 4 steps, lr(p) = 0.3 * (1 + cos(pi p / 4)) / 2 (a 1-epoch warm-up gives 0.15 at p = 1)
    assert [r["lr"] for r in lines] == pytest.approx([0.3 * (1 + math.cos(math.pi * p / 4)) / 2 for p in (1, 3)])
    cfg = tmp_path / "short.yaml"
    cfg.write_text("train:\n  epochs: 3\n  batch_size: 32\nbackbone: test_mae_tiny\nweights: null\n")
    capsys.readouterr()
    assert main(["sweep", "--config", str(cfg), f"out={tmp_path / 'sw'}", "--dry-run", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert len(state["trials"]) == 7  # SPEC §6's learning rates, each a valid 3-epoch config


# -- 2. `gapt seg train` without --config reads ADE20K ----------------------------------------
def test_seg_train_defaults_to_ade20k(tmp_path, monkeypatch):
    import gapt.seg.train as seg_train
    from test_seg_run import write_ade
    monkeypatch.setattr(seg_train, "HEAD_CHANNELS", 8)
    root = write_ade(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1)
    out = tmp_path / "run"
    assert main(["seg", "train", f"data.root={root}", "backbone=test_mae_tiny", "weights=null", "num_prompts=2",
                 "seg.crop_size=32", "train.batch_size=2", "seg.iterations=1", "data.num_workers=0", "device=cpu",
                 f"out={out}"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "ade20k" and res["data"]["num_classes"] == 150
    saved = (out / "config.yaml").read_text()
    assert "format: ade20k" in saved and "lr: 0.001" in saved  # the SETR recipe's lr, not classification's 0.1
    # a preset or an override still decides
    from gapt.config import load_config
    from gapt.seg.commands import SEG_DEFAULTS
    assert load_config(None, ["data.format=seg_folder"], base=SEG_DEFAULTS).data.format == "seg_folder"
    assert load_config(None, [], base=SEG_DEFAULTS).seg.iterations == 160000


# -- 4. `gapt analyze gates` reads segmentation runs --------------------------------------------
def test_analyze_gates_reads_a_segmentation_run(tmp_path, monkeypatch, capsys):
    import gapt.seg.train as seg_train
    from safetensors.torch import load_file
    from test_seg_run import overrides, write_ade
    monkeypatch.setattr(seg_train, "HEAD_CHANNELS", 8)
    root = write_ade(tmp_path / "ade", n_train=2, n_val=1)
    seg = tmp_path / "ade-gated"
    assert main(["seg", "train", *overrides(root, seg, gate_init=1, learn_temperature="true", num_prompts=2,
                                            **{"seg.iterations": 2, "seg.eval_every": 0, "train.lr": 0.5})]) == 0
    cls = tmp_path / "cls-gated"
    assert main(["train", *SHORT, "method=gated", "learn_temperature=true", "train.epochs=1", f"out={cls}"]) == 0
    capsys.readouterr()
    assert main(["analyze", "gates", str(seg), str(cls), "--out", str(tmp_path / "figs")]) == 0
    rows = json.loads((tmp_path / "figs" / "gates.json").read_text())["runs"]
    assert [r["run"] for r in rows] == [str(seg), str(cls)]
    tensors = load_file(seg / "tuned.safetensors")
    logits, temps = tensors["encoder.gate_logits"].double(), tensors["encoder.temperature"].double()
    # SPEC §2, by hand: g~_l = g_l * prod_{k > l} (1 - g_k); r_l = g~_l / sum_j g~_j
    g = torch.sigmoid(logits)
    tilde = torch.stack([g[i] * torch.prod(1 - g[i + 1:]) for i in range(len(g))])
    assert rows[0]["gate"] == pytest.approx(g.tolist(), abs=1e-6)
    assert rows[0]["selection_ratio"] == pytest.approx((tilde / tilde.sum()).tolist(), abs=1e-6)
    assert rows[0]["inserted_prompt_weight"] == pytest.approx(torch.prod(1 - g).item(), abs=1e-6)
    assert rows[0]["temperature"] == pytest.approx(temps.clamp(0.01, 10).tolist(), abs=1e-6)
    assert len(rows[1]["gate"]) == 3 and rows[0]["method"] == rows[1]["method"] == "gated"
