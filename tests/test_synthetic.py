"""Procedural tasks (gapt.data.synthetic) and the shipped micro MAE backbone."""
from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from gapt.config import DataConfig
from gapt.data.synthetic import (
    IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_TASKS, build_synthetic_bundle, generate_task,
    generate_unlabelled,
)

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "gapt" / "demo" / "assets" / "mae_vit_micro.safetensors"
SCRIPT = REPO / "scripts" / "pretrain_demo_mae.py"


def _cfg(name: str, num_samples: int = 200) -> DataConfig:
    return DataConfig(format="shapes", name=name, num_samples=num_samples)


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_demo_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _micro_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             num_classes=0, global_pool="token")


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_bundle_shapes_labels_and_balance(task):
    bundle = build_synthetic_bundle(_cfg(task, 240), image_size=32, seed=3)
    c = SYNTHETIC_TASKS[task]
    assert bundle.num_classes == c and len(bundle.class_names) == c
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (240, 60, 120)
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.augmented is False
        x, y = split[0]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
        images, labels = split.tensors()
        assert images.shape == (len(split), 3, 32, 32) and labels.dtype == torch.int64
        counts = torch.bincount(labels, minlength=c)
        assert counts.min() > 0 and counts.max() - counts.min() <= 1   # every class, balanced
        assert torch.allclose(images[0], x)
    info = bundle.info
    assert info["format"] == "shapes" and info["name"] == task and info["skipped_images"] == 0
    assert (info["num_train"], info["num_val"], info["num_test"]) == (240, 60, 120)
    assert "seed 3" in info["source"] and info["normalisation"] == "imagenet mean/std"


def test_normalisation_is_imagenet():
    bundle = build_synthetic_bundle(_cfg("shape", 50), 32, seed=0)
    x, _ = bundle.train[0]
    raw = bundle.train.images[0].float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std)


def test_deterministic_for_a_seed_and_splits_differ():
    a = build_synthetic_bundle(_cfg("count"), 32, seed=7)
    b = build_synthetic_bundle(_cfg("count"), 32, seed=7)
    c = build_synthetic_bundle(_cfg("count"), 32, seed=8)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert not torch.equal(a.train.images, c.train.images)
    # No image of one split appears in another.
    flat = {s: {bytes(im.numpy()) for im in getattr(a, s).images} for s in ("train", "val", "test")}
    assert not (flat["train"] & flat["val"]) and not (flat["train"] & flat["test"])
    assert not (flat["val"] & flat["test"])


def test_sizes_defaults_and_unknown_task():
    bundle = build_synthetic_bundle(_cfg("location", 0), 32, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2000, 500, 1000)
    small = build_synthetic_bundle(_cfg("location", 20), 32, seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (20, 50, 50)
    with pytest.raises(ValueError, match="count.*location.*orientation"):
        build_synthetic_bundle(_cfg("clevr"), 32, seed=0)


def test_resize_to_other_image_size():
    bundle = build_synthetic_bundle(_cfg("orientation", 50), 48, seed=0)
    x, _ = bundle.test[0]
    assert x.shape == (3, 48, 48) and "48x48" in bundle.info["resize"]


def test_labels_follow_the_scene():
    # Images of one class are more alike than images across classes only through structure,
    # so check a structural fact directly: more objects -> more non-background pixels.
    rng = np.random.default_rng(0)
    images, labels = generate_task("count", 600, rng)
    spread = images.astype(np.float32).std(axis=(1, 2, 3))
    assert spread[labels == 5].mean() > spread[labels == 0].mean()


def test_unlabelled_mix_is_seeded():
    a, b = generate_unlabelled(64, seed=1), generate_unlabelled(64, seed=1)
    assert a.dtype == np.uint8 and a.shape == (64, 32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, generate_unlabelled(64, seed=2))


def test_shipped_backbone_loads_strictly():
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(ASSET))
    model = _micro_vit()
    model.load_state_dict(state, strict=True)
    assert state["pos_embed"].shape == (1, 65, 64) and state["cls_token"].shape == (1, 1, 64)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert {"norm.weight", "norm.bias", "blocks.5.attn.qkv.weight", "patch_embed.proj.weight"} <= set(state)
    assert not any(k.startswith(("decoder", "mask_token", "head.")) for k in state)
    with safe_open(str(ASSET), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "gapt-backbone"
    arch = json.loads(meta["architecture"])
    assert (arch["embed_dim"], arch["depth"], arch["patch_size"]) == (64, 6, 4)
    assert json.loads(meta["recipe"])["mask_ratio"] == 0.75 and np.isfinite(float(meta["final_loss"]))
    assert ASSET.stat().st_size < 4 * 2 ** 20
    # Fixed sin-cos position embedding, zero for CLS, as the script builds it.
    script = _load_script()
    expected = script.sincos_pos_embed(64, 8, cls_token=True).unsqueeze(0)
    assert torch.allclose(state["pos_embed"], expected)


def test_pretraining_step_runs_and_is_seeded():
    script = _load_script()
    torch.manual_seed(0)
    images = torch.from_numpy(generate_unlabelled(8, seed=0)).permute(0, 3, 1, 2).contiguous()
    x = script.to_input(images)

    def one_run():
        torch.manual_seed(0)
        model = script.MaskedAutoencoder(script.build_encoder(), decoder_dim=32, decoder_depth=1,
                                         decoder_heads=2)
        opt = torch.optim.AdamW(script.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(0)
        losses = [script.mae_step(model, opt, x, 0.75, gen, lr=1e-3) for _ in range(2)]
        return losses, model

    losses, model = one_run()
    assert all(np.isfinite(losses)) and 0 < losses[0] < 10
    assert losses == one_run()[0]
    # pos_embed stays fixed; the encoder state has exactly timm's keys.
    assert not model.encoder.pos_embed.requires_grad
    assert set(script.encoder_state(model.encoder)) == set(_micro_vit().state_dict())
    _, pred, mask = model(x, 0.75)
    assert pred.shape == (8, 64, 48) and mask.sum(1).eq(48).all()
