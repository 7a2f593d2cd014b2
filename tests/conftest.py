"""Tiny ViTs for the test suite: 4 blocks, width 32, 32x32 inputs; nothing downloads."""
import warnings

import pytest
import torch

from gapt.model.backbones import BackboneSpec, register_backbone

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0, qkv_bias=True)
register_backbone(BackboneSpec("test_mae_tiny", TINY, pooling="mean", checkpoint_format="mae", image_size=32))
register_backbone(BackboneSpec("test_moco_tiny", TINY, pooling="cls", checkpoint_format="mocov3", image_size=32,
                               sincos_pos_embed=True))
register_backbone(BackboneSpec("test_dino_tiny", TINY, pooling="cls", checkpoint_format="dino", image_size=32))

torch.set_num_threads(2)


def tiny_model(backbone="test_mae_tiny", seed=0, **kw):
    """A tiny prompted ViT whose random backbone is not trivially symmetric."""
    from gapt import build_model
    torch.manual_seed(seed)
    kw.setdefault("num_prompts", 3)
    kw.setdefault("num_classes", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(backbone, **kw)
    with torch.no_grad():  # random, non-degenerate LayerNorm affines and biases (of the backbone, not its parts)
        for n, p in model.backbone.named_parameters():
            if any(part in n for part in (".adaptmlp.", ".lora_", ".ssf_")):
                continue
            if n.endswith("bias") or "cls_token" in n:
                p.normal_(0, 0.2)
            elif "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture
def evaluate_descs(monkeypatch):
    """The ``desc`` of every ``trainer.evaluate`` call a run makes ("val", "test", "test (last)", ...), in order.
    Clear the list between runs of one test."""
    from gapt.engine import trainer as T
    descs = []
    real = T.evaluate

    def counting(forward, dataset, *a, **k):
        descs.append(a[-1] if len(a) >= 5 else k.get("desc"))
        return real(forward, dataset, *a, **k)
    monkeypatch.setattr(T, "evaluate", counting)
    return descs
