"""Segmentation as MMSegmentation's SETR recipe runs it: multi-scale test inputs resized from the
decoded original image (checked against an independent numpy transcription of MultiScaleFlipAug +
Resize(keep_ratio) + Normalize), and the position embedding resized bilinearly (checked against
torch.nn.functional.interpolate and the closed form of bilinear interpolation on a linear ramp),
MoCo v3's sin-cos table included (against a transcription of MoCo v3's formula)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import gapt.seg.evaluate as seg_evaluate
from gapt import build_model
from gapt.config import load_config
from gapt.model.checkpoints import resize_pos_embed
from gapt.seg.data import build_folder_seg
from gapt.seg.evaluate import evaluate_seg
from gapt.seg.model import build_seg_model
from gapt.seg.recipe import eval_pipeline

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# -- an independent transcription of MMSegmentation 0.x's multi-scale test input ---------------------
def mmcv_rescale_size(h, w, scale):
    """mmcv.rescale_size((w, h), scale): the largest factor with long <= max(scale), short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def cv2_linear(img, oh, ow):
    """OpenCV INTER_LINEAR (no antialiasing) in float64: src = (dst + 0.5) * in / out - 0.5, clamped."""
    ih, iw = img.shape[:2]

    def taps(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y0, y1, fy = taps(oh, ih)
    x0, x1, fx = taps(ow, iw)
    a = img.astype(np.float64)
    top = a[y0][:, x0] * (1 - fx)[None, :, None] + a[y0][:, x1] * fx[None, :, None]
    bot = a[y1][:, x0] * (1 - fx)[None, :, None] + a[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def reference_pyramid(path, img_scale):
    """MultiScaleFlipAug(img_scale, img_ratios) -> Resize(keep_ratio) -> Normalize, per ratio, from the file."""
    original = np.array(Image.open(path).convert("RGB"))
    out = []
    for r in RATIOS:
        oh, ow = mmcv_rescale_size(*original.shape[:2], (int(img_scale[0] * r), int(img_scale[1] * r)))
        resized = np.clip(np.rint(cv2_linear(original, oh, ow)), 0, 255)
        out.append(((resized - MEAN) / STD).transpose(2, 0, 1))
    return out


@pytest.fixture
def seg_folder(tmp_path):
    """One 37x53 validation image with detail at every scale (gradients + texture), 2 classes."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:37, 0:53]
    img = np.stack([xx * 4.5, yy * 6.0, 128 + 60 * np.sin(xx / 2.0) * np.cos(yy / 3.0)], -1)
    img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
    mask = (xx > 25).astype(np.uint8)
    for sub in ("images/val", "masks/val"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "images/val/a.png")
    Image.fromarray(mask).save(tmp_path / "masks/val/a.png")
    (tmp_path / "classes.txt").write_text("left\nright\n")
    return tmp_path


class PixelModel(nn.Module):
    """A 1x1 convolution: stands in for the segmentation model (num_classes, (B, C, h, w) logits)."""
    num_classes = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x)


def test_multiscale_evaluation_resizes_each_scale_from_the_original(seg_folder, monkeypatch):
    crop = 16  # eval scale (64, 16): the 37x53 image is 16x23 single-scale; ratios give 8x11 .. 28x40
    dataset = build_folder_seg(seg_folder / "images/val", seg_folder / "masks/val", seg_folder / "classes.txt",
                               eval_pipeline(crop))
    seen = []
    inner = seg_evaluate.pyramid_inference

    def spy(model_fn, images, *args, **kwargs):
        seen.append([x.clone() for x in images])
        return inner(model_fn, images, *args, **kwargs)
    monkeypatch.setattr(seg_evaluate, "pyramid_inference", spy)
    metrics = evaluate_seg(PixelModel().eval(), dataset, crop, torch.device("cpu"), multi_scale=True)
    assert metrics.miou is not None and len(seen) == 1

    ref = reference_pyramid(seg_folder / "images/val/a.png", (4 * crop, crop))
    got = [x[0].numpy().astype(np.float64) for x in seen[0]]
    assert [g.shape for g in got] == [r.shape for r in ref]
    one_level = 1.0 / STD.min() + 1e-6
    for r, g in zip(ref, got):
        diff = np.abs(g - r)
        assert diff.max() <= one_level  # at most one grey level of rounding (float32 vs float64 ties)
        assert (diff < 1e-4).mean() > 0.99

    # the test can tell: the former path (each scale from the resized, normalised tensor) is far off
    single = dataset[0]["image"][None]
    old = [F.interpolate(single, size=r.shape[1:], mode="bilinear", align_corners=False)[0].numpy() for r in ref]
    assert max(np.abs(o - r).max() for o, r in zip(old, ref)) > 20 * one_level


def test_predict_logits_refuses_a_single_tensor_for_multi_scale():
    with pytest.raises(TypeError, match="one tensor per test ratio"):
        seg_evaluate.predict_logits(PixelModel(), torch.zeros(1, 3, 16, 16), (16, 16), 16, torch.device("cpu"), None,
                                    multi_scale=True)


# -- position embedding ---------------------------------------------------------------------------
def ramp_pos_embed(grid, dim=32):
    """CLS = 7, then every channel c of patch (i, j) = (c + 1) * (3 i + 5 j): a linear ramp."""
    i, j = np.mgrid[0:grid, 0:grid]
    ramp = torch.tensor((3.0 * i + 5.0 * j).reshape(-1), dtype=torch.float32)
    patches = ramp[:, None] * torch.arange(1, dim + 1, dtype=torch.float32)[None]
    return torch.cat([torch.full((1, dim), 7.0), patches])[None]


def bilinear_ramp(old, new, dim=32):
    """Closed form: bilinear interpolation (half-pixel centres, clamped) reproduces a linear ramp at
    the clamped source coordinate src = clip((o + 0.5) * old / new - 0.5, 0, old - 1)."""
    src = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
    ramp = torch.tensor((3.0 * src[:, None] + 5.0 * src[None, :]).reshape(-1), dtype=torch.float32)
    return ramp[:, None] * torch.arange(1, dim + 1, dtype=torch.float32)[None]


def test_resize_pos_embed_bilinear_on_a_ramp():
    pe = ramp_pos_embed(4)
    out = resize_pos_embed(pe, (7, 7), 1, mode="bilinear")
    assert torch.allclose(out[0, 1:], bilinear_ramp(4, 7), atol=1e-4)
    grid = pe[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    lib = F.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 49, -1)
    assert torch.allclose(out[:, 1:], lib, atol=1e-5) and torch.equal(out[:, :1], pe[:, :1])
    bicubic = resize_pos_embed(pe, (7, 7), 1)  # the default, timm's: differs at the borders
    assert not torch.allclose(bicubic[0, 1:], bilinear_ramp(4, 7), atol=1e-2)


def interpolate_grid(pos_embed, old, new, mode):
    """torch.nn.functional.interpolate on the patch part of a (1, 1 + old^2, D) embedding, as
    MMSegmentation's ``VisionTransformer.resize_pos_embed`` (align_corners=False), CLS row kept."""
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode=mode, align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def test_segmentation_loads_the_position_embedding_bilinearly(tmp_path):
    from conftest import tiny_model
    sd = {k: v.clone() for k, v in tiny_model().backbone.state_dict().items()}
    sd["pos_embed"] = ramp_pos_embed(4)  # test_mae_tiny: 32 px / patch 8 = a 4x4 grid
    torch.save({"model": sd}, tmp_path / "mae.pth")
    cfg = load_config(None, ["backbone=test_mae_tiny", f"weights={tmp_path / 'mae.pth'}", "num_prompts=2",
                             "seg.crop_size=56", "device=cpu"])
    seg = build_seg_model(cfg, num_classes=3, channels=8)
    enc = seg.encoder
    assert enc.pos_embed_interpolation == "bilinear"
    expected = interpolate_grid(sd["pos_embed"], 4, 7, "bilinear")
    assert torch.allclose(enc.backbone.pos_embed, expected, atol=1e-5)
    assert torch.allclose(enc.backbone.pos_embed[0, 1:], bilinear_ramp(4, 7), atol=1e-4)  # and the closed form
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = build_model("test_mae_tiny", num_prompts=2, num_classes=3, weights=str(tmp_path / "mae.pth"),
                          image_size=56)
    assert cls.pos_embed_interpolation == "bicubic"
    assert torch.allclose(cls.backbone.pos_embed, interpolate_grid(sd["pos_embed"], 4, 7, "bicubic"), atol=1e-5)
    assert not torch.allclose(cls.backbone.pos_embed, expected, atol=1e-2)

    # a window smaller than the crop (3x3 patches of 7x7): the embedding is resized bilinearly too
    x = torch.randn(1, 3, 24, 24)
    tokens = enc.backbone.patch_embed(x).reshape(1, 9, -1)
    pos = enc.backbone.pos_embed
    small = interpolate_grid(pos, 7, 3, "bilinear")
    expected = torch.cat([enc.backbone.cls_token + small[:, :1], tokens + small[:, 1:]], dim=1)
    assert torch.allclose(enc.embed(x), expected, atol=1e-5)
    timm_way = interpolate_grid(pos, 7, 3, "bicubic")
    timm_way = torch.cat([enc.backbone.cls_token + timm_way[:, :1], tokens + timm_way[:, 1:]], dim=1)
    assert not torch.allclose(enc.embed(x), timm_way, atol=1e-3)


def moco_v3_sincos(side, dim, temperature=10000.0):
    """MoCo v3 ``vits.py`` build_2d_sincos_position_embedding, transcribed: meshgrid(grid_w, grid_h) in
    'ij' order, omega = 1 / T^(d / (dim/4)), [sin, cos](out_w), [sin, cos](out_h), a zero CLS row."""
    grid_w, grid_h = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


@pytest.fixture
def moco_file(tmp_path):
    """vit-b-300ep.pth.tar in miniature for test_moco_tiny (32 px, patch 8: MoCo's table at a 4x4 grid)."""
    from conftest import tiny_model
    sd = {k: v.clone() for k, v in tiny_model("test_moco_tiny").backbone.state_dict().items()}
    sd["pos_embed"] = moco_v3_sincos(4, 32)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}, path)
    return path


@pytest.mark.parametrize("weights", ["file", None])
def test_segmentation_moco_table_is_interpolated_as_mmsegmentation(moco_file, weights):
    """seg.sincos_pos_embed=interpolate (the recipe): the checkpoint's 4x4 table resized bilinearly to the
    crop's 7x7 grid, as MMSegmentation's ViT loads any pos_embed; rebuild: MoCo's formula at 7x7.
    Without a file, MoCo's table at its pre-training grid stands in for the checkpoint's."""
    path = str(moco_file) if weights else "null"
    base = ["backbone=test_moco_tiny", f"weights={path}", "num_prompts=2", "seg.crop_size=56", "device=cpu"]
    interpolated = build_seg_model(load_config(None, base), num_classes=3, channels=8).encoder.backbone.pos_embed
    assert torch.allclose(interpolated, interpolate_grid(moco_v3_sincos(4, 32), 4, 7, "bilinear"), atol=1e-6)
    assert not interpolated.requires_grad  # MoCo's table stays fixed
    rebuilt = build_seg_model(load_config(None, base + ["seg.sincos_pos_embed=rebuild"]), num_classes=3,
                              channels=8).encoder.backbone.pos_embed
    assert torch.allclose(rebuilt, moco_v3_sincos(7, 32), atol=1e-6) and not rebuilt.requires_grad
    assert not torch.allclose(interpolated, rebuilt, atol=1e-2)


def test_seg_tuned_file_without_the_sincos_key_is_a_rebuilt_table():
    """A tuned file written before seg.sincos_pos_embed existed was trained on the rebuilt table."""
    from gapt.seg.model import config_from_identity
    cfg = load_config(None, ["backbone=test_moco_tiny"])
    ident = {"backbone": "test_moco_tiny", "method": "gated", "num_prompts": 2, "crop_size": 56}
    assert config_from_identity(cfg, ident).seg.sincos_pos_embed == "rebuild"
    for mode in ("interpolate", "rebuild"):
        assert config_from_identity(cfg, dict(ident, sincos_pos_embed=mode)).seg.sincos_pos_embed == mode


def test_hub_weights_are_regridded_bilinearly(monkeypatch):
    """weights=timm: the hub model is built at its own grid, then its embedding is resized by the
    requested mode (timm's own resize, bicubic, is replaced)."""
    import gapt.model.build as build
    from gapt.model.backbones import BackboneSpec, create_vit
    spec = BackboneSpec("hub_tiny", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2), pooling="mean",
                        checkpoint_format="timm", image_size=32, timm_name="hub_tiny")

    def fake_create(s, image_size=None, pretrained_timm=False):
        assert pretrained_timm and image_size is None  # the hub's own grid, not the target's
        vit = create_vit(BackboneSpec("x", s.arch, "mean", "mae", image_size=32))
        with torch.no_grad():
            vit.pos_embed.copy_(ramp_pos_embed(4))
        return vit
    monkeypatch.setattr(build, "create_vit", fake_create)
    vit, _ = build.build_backbone(spec, "timm", image_size=56, pos_embed_interpolation="bilinear")
    assert tuple(vit.patch_embed.grid_size) == (7, 7)
    assert torch.allclose(vit.pos_embed[0, 1:], bilinear_ramp(4, 7), atol=1e-4)
    assert torch.equal(vit.pos_embed[0, 0], torch.full((32,), 7.0))
