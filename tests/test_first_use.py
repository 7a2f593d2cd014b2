"""Issue 11, "what a new user meets first": each defect found by using gapt as a newcomer
would, with the test that now guards it (MoCo v3 sin-cos grid, seg default format, warm-up
default, `analyze gates` on segmentation runs)."""
import json
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
