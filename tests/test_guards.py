"""Issue 11 item 5: tests that can catch a regression, each checked against something other than the
code under test (an independent run, SPEC's values kept here, counted calls, a killed process)."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gapt.cli import main
from gapt.config import load_config, warmup_epochs
from gapt.engine.trainer import train

TINY = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "train.batch_size=16",
        "data.format=shapes", "data.name=count", "data.num_samples=48", "data.num_workers=0", "device=cpu"]
REPO = Path(__file__).resolve().parents[1]


# -- linear probing on cached features ---------------------------------------------------------
def test_linear_probe_cached_equals_uncached(tmp_path, monkeypatch):
    over = [*TINY, "method=linear", "train.epochs=2", "train.lr=0.5"]
    cached = train(load_config(None, over + [f"out={tmp_path / 'cached'}"]))
    from gapt.model import PromptedViT
    monkeypatch.setattr(PromptedViT, "frozen_prefix_blocks", property(lambda self: 0))  # no feature cache
    plain = train(load_config(None, over + [f"out={tmp_path / 'plain'}"]))
    assert cached["prefix_cache_blocks"] == 4 and plain["prefix_cache_blocks"] == 0
    a, b = load_file(tmp_path / "cached" / "tuned.safetensors"), load_file(tmp_path / "plain" / "tuned.safetensors")
    assert set(a) == set(b) == {"head.weight", "head.bias"}
    assert not torch.allclose(a["head.weight"], torch.zeros_like(a["head.weight"]))
    for k in a:  # same seed, same batches: the same head to float tolerance
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert cached["metrics"] == pytest.approx(plain["metrics"], abs=1e-4)


# -- presets against SPEC §5/§6, from a table kept here -----------------------------------------
FGVC = {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}
VTAB = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
        "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
        "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"]
# SPEC §6: SGD momentum 0.9, 100 epochs, 10 linear warm-up epochs, cosine, weight decay 0, batch 64 / 128;
# SPEC §5: the final run trains on train.json alone (FGVC) and on train800val200 (VTAB).
SPEC = {"fgvc": dict(batch=64, final_train="train.json"), "vtab": dict(batch=128, final_train="train800val200")}


def _stub_dataset(tmp_path, benchmark, name):
    """The smallest folder each format's reader accepts (split lists only; no image is opened)."""
    if benchmark == "fgvc":
        root = tmp_path / name
        image_dir = {"cub": "images", "nabirds": "images", "dogs": "Images"}.get(name, ".")
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            (root / f"{split}.json").write_text(json.dumps({"a.jpg": 0}))
        return root
    root = tmp_path / "vtab"
    (root / name).mkdir(parents=True)
    for split in ("train800", "val200", "train800val200", "test"):
        (root / name / f"{split}.txt").write_text("images/a.jpg 0\n")
    return root


@pytest.mark.parametrize("backbone", ["mae_vitb16", "mocov3_vitb16"])
def test_presets_follow_spec(backbone, tmp_path):
    from gapt.data.fgvc import parse_fgvc
    from gapt.data.vtab import parse_vtab
    import gapt
    presets = Path(gapt.__file__).parent / "configs"
    expected = [("fgvc", n) for n in FGVC] + [("vtab", t) for t in VTAB]
    found = sorted((p.parent.parent.name, p.stem) for p in presets.glob(f"*/{backbone}/*.yaml"))
    assert found == sorted(expected)
    for benchmark, name in expected:
        cfg = load_config(str(presets / benchmark / backbone / f"{name}.yaml"))
        t, where = cfg.train, f"{benchmark}/{backbone}/{name}"
        assert (cfg.backbone, cfg.data.format, cfg.data.name) == (backbone, benchmark, name), where
        assert (t.optimizer, t.momentum, t.epochs, warmup_epochs(t), t.schedule) == ("sgd", 0.9, 100, 10, "cosine"), where
        assert (t.weight_decay, t.batch_size, t.seed) == (0.0, SPEC[benchmark]["batch"], 42), where
        assert cfg.data.final is False, where  # the lr search selects on val; finals set data.final=true
        root = _stub_dataset(tmp_path / where.replace("/", "_"), benchmark, name)
        final = load_config(str(presets / benchmark / backbone / f"{name}.yaml"),
                            [f"data.root={root}", "data.final=true"])
        parse = parse_fgvc if benchmark == "fgvc" else parse_vtab
        assert parse(final.data).split_names["train"] == SPEC[benchmark]["final_train"], where
