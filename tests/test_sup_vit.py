"""sup_vitb16: Google's original ViT .npz layout, on a tiny npz written here key by key (SPEC §11)."""
from functools import partial

import numpy as np
import pytest
import torch

from gapt.model.backbones import BackboneSpec, register_backbone

D, HEADS, DEPTH, PATCH, IMG, CLASSES = 32, 2, 4, 8, 32, 7
register_backbone(BackboneSpec("test_sup_tiny", dict(patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                                     mlp_ratio=4.0, qkv_bias=True),
                               pooling="cls", checkpoint_format="google_npz", image_size=IMG))


def write_google_npz(path, extra=None, drop=()):
    """The layout as the original JAX ViT saves it: HWIO conv kernel, (D, heads, head_dim) q/k/v
    kernels, (heads, head_dim, D) out kernel, (in, out) dense kernels, LayerNorm scale/bias."""
    rng = np.random.default_rng(0)
    hd, n = D // HEADS, (IMG // PATCH) ** 2

    def r(*shape, s=0.2):
        return (rng.standard_normal(shape) * s).astype(np.float32)
    w = {"embedding/kernel": r(PATCH, PATCH, 3, D), "embedding/bias": r(D), "cls": r(1, 1, D),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + n, D),
         "Transformer/encoder_norm/scale": 1 + r(D), "Transformer/encoder_norm/bias": r(D),
         "head/kernel": r(D, CLASSES), "head/bias": r(CLASSES), "pre_logits/kernel": r(D, D), "pre_logits/bias": r(D)}
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = 1 + r(D), r(D)
        w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = 1 + r(D), r(D)
        for q in ("query", "key", "value"):
            w[f"{b}MultiHeadDotProductAttention_1/{q}/kernel"] = r(D, HEADS, hd)
            w[f"{b}MultiHeadDotProductAttention_1/{q}/bias"] = r(HEADS, hd)
        w[b + "MultiHeadDotProductAttention_1/out/kernel"] = r(HEADS, hd, D)
        w[b + "MultiHeadDotProductAttention_1/out/bias"] = r(D)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = r(D, 4 * D), r(4 * D)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = r(4 * D, D), r(D)
    w.update(extra or {})
    for k in drop:
        w.pop(k)
    np.savez(path, **w)
    return w


def test_npz_loads_and_matches_timm_and_hand_transcription(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from gapt import build_model
    from gapt.model.backbones import BACKBONES
    w = write_google_npz(tmp_path / "vit.npz")
    model = build_model("test_sup_tiny", method="linear", num_classes=CLASSES, weights=str(tmp_path / "vit.npz")).eval()
    assert model.pooling == "cls" and BACKBONES["sup_vitb16"].pooling == "cls"
    vit = model.backbone
    # by hand from the layout: the conv kernel HWIO -> OIHW, q/k/v kernels (D, heads, hd) -> rows of qkv
    torch.testing.assert_close(vit.patch_embed.proj.weight, torch.from_numpy(w["embedding/kernel"]).permute(3, 2, 0, 1))
    q = w["Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel"].reshape(D, D).T
    torch.testing.assert_close(vit.blocks[2].attn.qkv.weight[:D], torch.from_numpy(q))
    torch.testing.assert_close(vit.blocks[1].mlp.fc1.weight,
                               torch.from_numpy(w["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].T))
    torch.testing.assert_close(vit.norm.weight, torch.from_numpy(w["Transformer/encoder_norm/scale"]))

    # timm's own model reading the same npz (with its head): same CLS features, same logits through that head
    ref = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                            num_classes=CLASSES, global_pool="token", qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_pretrained(str(tmp_path / "vit.npz"))
    torch.testing.assert_close(ref.head.weight, torch.from_numpy(w["head/kernel"].T))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.head(feats), ref(x), atol=1e-5, rtol=1e-5)


def test_npz_strict_check_names_keys(tmp_path):
    from gapt import build_model
    from gapt.model.checkpoints import CheckpointError
    write_google_npz(tmp_path / "missing.npz", drop=["Transformer/encoderblock_3/MlpBlock_3/Dense_1/bias"])
    with pytest.raises(CheckpointError, match="missing keys: Transformer/encoderblock_3/MlpBlock_3/Dense_1/bias"):
        build_model("test_sup_tiny", method="linear", weights=str(tmp_path / "missing.npz"))
    write_google_npz(tmp_path / "extra.npz", extra={"Transformer/encoderblock_4/LayerNorm_0/scale": np.ones(D, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected keys: Transformer/encoderblock_4"):
        build_model("test_sup_tiny", method="linear", weights=str(tmp_path / "extra.npz"))
    write_google_npz(tmp_path / "wide.npz", extra={"embedding/bias": np.zeros(D + 1, np.float32)})
    with pytest.raises(CheckpointError, match="wide.npz"):
        build_model("test_sup_tiny", method="linear", weights=str(tmp_path / "wide.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        build_model("test_sup_tiny", method="linear", weights=str(tmp_path / "junk.npz"))


def test_npz_other_image_size_resizes_position_embedding_as_gapt_does(tmp_path):
    """At 48x48 (grid 6) the file's 4x4 position grid is resized by gapt's own rule (bicubic, or bilinear)."""
    import torch.nn.functional as F
    from gapt import build_model
    w = write_google_npz(tmp_path / "vit.npz")
    pos = torch.from_numpy(w["Transformer/posembed_input/pos_embedding"])
    for mode in ("bicubic", "bilinear"):
        model = build_model("test_sup_tiny", method="linear", weights=str(tmp_path / "vit.npz"), image_size=48,
                            pos_embed_interpolation=mode)
        grid = pos[:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
        want = F.interpolate(grid, size=(6, 6), mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, D)
        torch.testing.assert_close(model.backbone.pos_embed[:, 1:], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.backbone.pos_embed[:, :1], pos[:, :1])
        torch.testing.assert_close(model.backbone.blocks[3].mlp.fc2.bias,
                                   torch.from_numpy(w["Transformer/encoderblock_3/MlpBlock_3/Dense_1/bias"]))
