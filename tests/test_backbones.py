"""DINOv2 (with/without registers), I-JEPA and DINOv3 backbones: tiny checkpoints written by hand in
each official layout (SPEC §11) give the logits of timm's own model loading the same file; prompts
go after CLS + registers; on a RoPE Eva (DINOv3) every prompt method equals a forward pass written
from the equations, prompts getting no rotary embedding."""
import json
import math
import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit

from gapt import build_model
from gapt.cli import main
from gapt.model.backbones import BACKBONES, IJEPA_ENCODER, BackboneSpec, create_vit, register_backbone
from gapt.model.checkpoints import CheckpointError

P, D, DEPTH, HEADS, HD = 8, 32, 4, 2, 16
NP, REG = 3, 2
TINY = dict(patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, qkv_bias=True)
EVA = dict(patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, qkv_bias=True, init_values=1e-5,
           rope_type="dinov3", rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True,
           use_abs_pos_emb=False, num_reg_tokens=REG, use_fc_norm=False, norm_layer=partial(nn.LayerNorm, eps=1e-5))
register_backbone(BackboneSpec("test_dinov2_tiny", dict(TINY, init_values=1e-5), "cls", "dinov2", image_size=64))
register_backbone(BackboneSpec("test_dinov2reg_tiny", dict(TINY, init_values=1e-5, reg_tokens=4, no_embed_class=True),
                               "cls", "dinov2", image_size=64))
register_backbone(BackboneSpec("test_timmfmt_reg_tiny", dict(TINY, init_values=1e-5, reg_tokens=4,
                                                             no_embed_class=True), "cls", "timm", image_size=64))
register_backbone(BackboneSpec("test_ijepa_tiny", dict(TINY, class_token=False, global_pool="avg"), "mean_normed",
                               "ijepa", image_size=64))
for _name, _which in (("test_ijepa_target_tiny", "target_encoder"), ("test_ijepa_context_tiny", "encoder")):
    register_backbone(BackboneSpec(_name, dict(TINY, class_token=False, global_pool="avg"), "mean_normed", "ijepa",
                                   image_size=64, extra={IJEPA_ENCODER: _which}))  # as ijepa_vith14[_context]
register_backbone(BackboneSpec("test_dinov3_tiny", EVA, "cls", "dinov3", image_size=32, family="eva"))


def rnd(*shape, scale=0.3):
    return torch.randn(*shape) * scale


def vit_blocks(prefix="", layer_scale=True):
    """The per-block keys of the official ViT layouts (DINOv2, I-JEPA), random non-degenerate values."""
    sd = {}
    for i in range(DEPTH):
        b = f"{prefix}blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rnd(D), b + "norm1.bias": rnd(D),
                   b + "attn.qkv.weight": rnd(3 * D, D), b + "attn.qkv.bias": rnd(3 * D),
                   b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D),
                   b + "norm2.weight": 1 + rnd(D), b + "norm2.bias": rnd(D),
                   b + "mlp.fc1.weight": rnd(4 * D, D), b + "mlp.fc1.bias": rnd(4 * D),
                   b + "mlp.fc2.weight": rnd(D, 4 * D), b + "mlp.fc2.bias": rnd(D)})
        if layer_scale:
            sd.update({b + "ls1.gamma": 0.5 + rnd(D), b + "ls2.gamma": 0.5 + rnd(D)})
    return sd


def dinov2_file(path, registers: bool):
    """dinov2_vitb14[_reg4]_pretrain.pth in miniature: a plain state dict, CLS + 8x8 grid position
    embedding (the 518-px grid's stand-in), mask_token, register_tokens with registers."""
    torch.manual_seed(1)
    sd = {"cls_token": rnd(1, 1, D), "pos_embed": rnd(1, 1 + 64, D), "mask_token": torch.zeros(1, D),
          "patch_embed.proj.weight": rnd(D, 3, P, P, scale=0.1), "patch_embed.proj.bias": rnd(D),
          **vit_blocks(), "norm.weight": 1 + rnd(D), "norm.bias": rnd(D)}
    if registers:
        sd["register_tokens"] = rnd(1, 4, D)
    torch.save(sd, path)
    return path


def ijepa_encoder_dict(seed):
    """One encoder of an I-JEPA file: DDP's ``module.`` keys, no CLS token, a sin-cos-sized 8x8 table."""
    torch.manual_seed(seed)
    return {"module.pos_embed": rnd(1, 64, D), "module.patch_embed.proj.weight": rnd(D, 3, P, P, scale=0.1),
            "module.patch_embed.proj.bias": rnd(D), **vit_blocks("module.", layer_scale=False),
            "module.norm.weight": 1 + rnd(D), "module.norm.bias": rnd(D)}


def ijepa_file(path, encoders=("encoder", "target_encoder")):
    """IN1K-vit.h.14-300e.pth.tar in miniature, the dict of I-JEPA's ``src/train.py`` save_checkpoint:
    encoder / predictor / target_encoder (each under DDP: ``module.`` keys), opt, scaler, epoch, loss,
    batch_size, world_size, lr. The context and target encoders hold unrelated values.
    Returns (path, {name: the encoder tensors written})."""
    written = {"encoder": ijepa_encoder_dict(2), "target_encoder": ijepa_encoder_dict(3)}
    torch.manual_seed(4)
    ckpt = {"predictor": {"module.predictor_embed.weight": rnd(16, D), "module.mask_token": rnd(1, 1, 16)},
            "opt": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": rnd(D)}},
                    "param_groups": [{"lr": 0.001, "weight_decay": 0.04, "params": [0]}]},
            "scaler": None, "epoch": 300, "loss": 0.123, "batch_size": 128, "world_size": 16, "lr": 0.001}
    ckpt.update({name: written[name] for name in encoders})
    torch.save(ckpt, path)
    return path, {name: written[name] for name in encoders}


def dinov3_file(path):
    """dinov3_vitb16_pretrain_lvd1689m.pth in miniature: storage_tokens, ls1.gamma, qkv.bias with its
    bias_mask (k part masked to zero), rope_embed.periods, mask_token."""
    torch.manual_seed(3)
    sd = {"cls_token": rnd(1, 1, D), "storage_tokens": rnd(1, REG, D), "mask_token": torch.zeros(1, D),
          "rope_embed.periods": torch.ones(HD // 4),
          "patch_embed.proj.weight": rnd(D, 3, P, P, scale=0.1), "patch_embed.proj.bias": rnd(D),
          "norm.weight": 1 + rnd(D), "norm.bias": rnd(D)}
    for k, v in vit_blocks().items():
        sd[k] = v
        if k.endswith("attn.qkv.bias"):
            v[D:2 * D] = 0
            sd[k.replace("bias", "bias_mask")] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    torch.save(sd, path)
    return path


def timm_logits(model_cls, kwargs, path, filter_fn, head: nn.Linear, images):
    """timm's own model + timm's own filter on the same file (as build_model_with_cfg does), gapt's head."""
    ref = model_cls(num_classes=head.out_features, **kwargs).eval()
    sd = filter_fn(torch.load(path, weights_only=True), ref)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        ref.head.weight.copy_(head.weight)
        ref.head.bias.copy_(head.bias)
        return ref(images)


def gapt_model(backbone, path, **kw):
    torch.manual_seed(0)
    kw.setdefault("method", "linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(backbone, weights=str(path), num_classes=5, image_size=32, prompt_dropout=0.0, **kw).eval()


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("backbone,registers", [("test_dinov2_tiny", False), ("test_dinov2reg_tiny", True),
                                                ("test_timmfmt_reg_tiny", True)])
def test_dinov2_file_gives_timm_logits(tmp_path, images, backbone, registers):
    path = dinov2_file(tmp_path / "dinov2.pth", registers)
    model = gapt_model(backbone, path)
    assert model.backbone.num_prefix_tokens == (5 if registers else 1) and model.pooling == "cls"
    extra = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    expected = timm_logits(timm_vit.VisionTransformer, dict(TINY, img_size=32, init_values=1e-5, **extra), path,
                           timm_vit.checkpoint_filter_fn, model.head, images)
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)
    # the 8x8 grid of the file was resized to the run's 4x4 grid
    assert model.backbone.pos_embed.shape[1] == 16 + (0 if registers else 1)


def test_dinov2_prompts_go_after_the_registers(tmp_path, images):
    """[CLS, 4 registers, prompts, patches] through timm's own blocks, spliced by hand."""
    model = gapt_model("test_dinov2reg_tiny", dinov2_file(tmp_path / "d.pth", True), method="vpt-shallow",
                       num_prompts=NP)
    vit = model.backbone
    with torch.no_grad():
        x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=P).flatten(2).transpose(1, 2)
        x = x + vit.pos_embed  # no_embed_class: the position embedding covers the patches only
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1),
                       model.prompt_embeddings.expand(2, -1, -1), x], 1)
        for blk in vit.blocks:
            x = blk(x)
        expected = model.head(vit.norm(x)[:, 0])
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_ijepa_file_gives_timm_logits(tmp_path, images):
    """timm's own model and filter on the target encoder, handed to timm under the 'encoder' key it reads."""
    path, written = ijepa_file(tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    model = gapt_model("test_ijepa_tiny", path)
    assert model.backbone.num_prefix_tokens == 0 and model.pooling == "mean_normed"
    target_only = tmp_path / "target_as_encoder.pth"
    torch.save({"encoder": written["target_encoder"]}, target_only)
    expected = timm_logits(timm_vit.VisionTransformer, dict(TINY, img_size=32, class_token=False, global_pool="avg",
                                                            fc_norm=False), target_only, timm_vit.checkpoint_filter_fn,
                           model.head, images)
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)


def _ijepa_backbone(backbone, path):
    """The backbone's tensors under the file's names: 'module.' + the timm key (built at the file's 64 px,
    so the position embedding is the file's own 8x8 table, not a resized one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(backbone, method="linear", weights=str(path), num_classes=5, image_size=64)
    return {f"module.{k}": v for k, v in model.backbone.state_dict().items()}


@pytest.mark.parametrize("backbone", ["test_ijepa_tiny", "test_ijepa_target_tiny"])
def test_ijepa_loads_the_target_encoder_by_default(tmp_path, backbone):
    """I-JEPA evaluates its target encoder (I-JEPA paper, App. A.1); timm's filter alone would take `encoder`."""
    path, written = ijepa_file(tmp_path / "ijepa.pth.tar")
    loaded = _ijepa_backbone(backbone, path)
    target, context = written["target_encoder"], written["encoder"]
    assert set(loaded) == set(target)
    for k, v in loaded.items():
        assert torch.equal(v, target[k]), k
        assert not torch.allclose(v, context[k]), k


def test_ijepa_context_encoder_is_an_explicit_backbone(tmp_path):
    path, written = ijepa_file(tmp_path / "ijepa.pth.tar")
    loaded = _ijepa_backbone("test_ijepa_context_tiny", path)
    assert set(loaded) == set(written["encoder"])
    assert all(torch.equal(v, written["encoder"][k]) for k, v in loaded.items())
    assert BACKBONES["ijepa_vith14"].extra[IJEPA_ENCODER] == "target_encoder"
    assert BACKBONES["ijepa_vith14_context"].extra[IJEPA_ENCODER] == "encoder"


def test_ijepa_file_without_the_asked_encoder(tmp_path):
    path, written = ijepa_file(tmp_path / "context_only.pth.tar", encoders=("encoder",))
    with pytest.raises(CheckpointError, match=r"context_only.pth.tar is an I-JEPA-style file without 'target_encoder'"):
        _ijepa_backbone("test_ijepa_target_tiny", path)
    # no explicit choice (a timm name, or test_ijepa_tiny): a file with only `encoder` is read as timm reads it
    loaded = _ijepa_backbone("test_ijepa_tiny", path)
    assert all(torch.equal(v, written["encoder"][k]) for k, v in loaded.items())
    path, _ = ijepa_file(tmp_path / "target_only.pth.tar", encoders=("target_encoder",))
    with pytest.raises(CheckpointError, match=r"target_only.pth.tar is an I-JEPA-style file without 'encoder'"):
        _ijepa_backbone("test_ijepa_context_tiny", path)


def test_ijepa_hub_weights_are_refused_for_the_target_encoder():
    """timm's hub copy is converted by timm's filter from `encoder`: not what ijepa_vith14 reads (no download)."""
    with pytest.raises(ValueError, match=r"timm's hub weights .* are its context encoder.*ijepa_vith14_context"):
        build_model("ijepa_vith14", weights="timm", num_classes=5)


def test_dinov3_file_gives_timm_logits(tmp_path, images):
    path = dinov3_file(tmp_path / "dinov3.pth")
    model = gapt_model("test_dinov3_tiny", path)
    assert model.backbone.num_prefix_tokens == 1 + REG
    expected = timm_logits(timm_eva.Eva, dict(EVA, img_size=32, global_pool="token", dynamic_img_size=True), path,
                           timm_eva.checkpoint_filter_fn, model.head, images)
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_layout_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pth"
    sd = torch.load(dinov2_file(tmp_path / "d.pth", True), weights_only=True)
    sd["blocks.9.extra"] = torch.zeros(3)
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match=r"bad.pth.*unexpected keys: blocks.9.extra"):
        gapt_model("test_dinov2reg_tiny", bad)
    with pytest.raises(CheckpointError, match=r"d.pth: timm's checkpoint_filter_fn"):  # a file without registers
        gapt_model("test_dinov2reg_tiny", dinov2_file(tmp_path / "d.pth", False))
    with pytest.raises(CheckpointError, match=r"d.pth: timm's checkpoint_filter_fn"):  # registers, no-register model
        gapt_model("test_dinov2_tiny", dinov2_file(tmp_path / "d.pth", True))


# -- DINOv3 / RoPE: the equations --------------------------------------------------------------------
def rope_tables(grid: int):
    """DINOv3 RoPE: coords (i + 0.5) / H mapped to [-1, 1] per axis, periods 100^(2j / (d/2)),
    j < d/4, angles 2 pi c / period for (y, x), the d/2 angles repeated twice (rotate-half layout)."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], -1)                    # (N, 2)
    periods = 100.0 ** (2 * torch.arange(HD // 4, dtype=torch.float32) / (HD // 2))
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)          # (N, d/2)
    angles = torch.cat([angles, angles], -1)                                  # (N, d)
    return angles.sin(), angles.cos()


def rotate(x, sin, cos):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def eva_reference(model, images, method):
    vit, B = model.backbone, images.shape[0]
    ln = lambda x, m: F.layer_norm(x, (D,), m.weight, m.bias, 1e-5)
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=P).flatten(2).transpose(1, 2)
    n = x.shape[1]
    sin, cos = rope_tables(int(math.isqrt(n)))
    x = torch.cat([vit.cls_token.expand(B, -1, -1), vit.reg_token.expand(B, -1, -1), x], 1)  # no absolute position
    pre = 1 + REG
    tau = model.temperature if model.temperature is not None else torch.ones(DEPTH)
    k_insert = model.insert_at_block - 1
    for l, blk in enumerate(vit.blocks):
        if l == k_insert:
            x = torch.cat([x[:, :pre], model.prompt_embeddings.expand(B, -1, -1), x[:, pre:]], 1)
        elif method == "vpt-deep" and l > 0:
            x = torch.cat([x[:, :pre], model.deep_prompt_embeddings[l - 1].expand(B, -1, -1), x[:, pre + NP:]], 1)
        prompt_in = x[:, pre:pre + NP]
        h = ln(x, blk.norm1)
        bias = torch.cat([blk.attn.q_bias, torch.zeros(D), blk.attn.v_bias])
        q, k, v = (h @ blk.attn.qkv.weight.T + bias).reshape(B, -1, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
        # rotary position on the n patch tokens only; CLS, registers and prompts keep theirs unrotated
        q = torch.cat([q[:, :, :-n], rotate(q[:, :, -n:], sin, cos)], 2)
        k = torch.cat([k[:, :, :-n], rotate(k[:, :, -n:], sin, cos)], 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) * HD ** -0.5 / tau[l], dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, -1, D)
        x = x + blk.gamma_1 * (a @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        h = F.gelu(ln(x, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        x = x + blk.gamma_2 * (h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
        if method == "gated" and l < DEPTH - 1:
            g = torch.sigmoid(model.gate_logits[l])
            x = torch.cat([x[:, :pre], g * x[:, pre:pre + NP] + (1 - g) * prompt_in, x[:, pre + NP:]], 1)
    return ln(x, vit.norm)[:, 0] @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("method,extra", [("gated", {}), ("vpt-shallow", {}), ("vpt-deep", {}),
                                          ("vpt-at-block", {"insert_at_block": 3})])
def test_dinov3_prompt_methods_equal_the_equations(tmp_path, images, method, extra):
    model = gapt_model("test_dinov3_tiny", dinov3_file(tmp_path / "d3.pth"), method=method, num_prompts=NP,
                       learn_temperature=True, **extra)
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.5, 2.0, 1.3, 0.7]))
        if model.gate_logits is not None:
            model.gate_logits.copy_(torch.tensor([-1.0, 0.3, 2.0]))
        expected = eva_reference(model, images, method)
        assert torch.allclose(model(images), expected, atol=1e-5)
        if method == "vpt-at-block":  # the frozen-prefix cache runs the prompt-free blocks with RoPE too
            assert torch.allclose(model.forward_from_frozen(model.frozen_features(images)), expected, atol=1e-5)
        maps = model.attention_maps(images)
        assert len(maps) == DEPTH and maps[-1].shape[-1] == 1 + REG + NP + 16
    # gates and temperatures learn
    model.train()
    F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    assert model.temperature.grad.abs().sum() > 0 and model.prompt_embeddings.grad.abs().sum() > 0
    if model.gate_logits is not None:
        assert model.gate_logits.grad.abs().sum() > 0


def test_dinov3_trains_and_evaluates_from_the_cli(tmp_path, capsys):
    path = dinov3_file(tmp_path / "d3.pth")
    run = tmp_path / "run"
    assert main(["train", "backbone=test_dinov3_tiny", f"weights={path}", "image_size=32", "num_prompts=2",
                 "method=gated", "learn_temperature=true", "data.format=shapes", "data.name=count",
                 "data.num_samples=32", "data.num_workers=0", "device=cpu", "train.batch_size=16", "train.epochs=1",
                 "train.warmup_epochs=0", "train.logger=none", f"out={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0  # rebuilt from the tuned file
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(results["metrics"]["test_top1"])


# -- the registry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,timm_name,kwargs", [
    ("dinov2_vitb14", "vit_base_patch14_dinov2", {}),
    ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", {}),
    ("ijepa_vith14", "vit_huge_patch14_gap_224", {}),
    ("ijepa_vith14_context", "vit_huge_patch14_gap_224", {}),
    ("dinov3_vitb16", "vit_base_patch16_dinov3", {"global_pool": "token"})])
def test_registered_backbones_are_timms_architectures(name, timm_name, kwargs):
    import timm
    spec = BACKBONES[name]
    with torch.device("meta"):
        ours = create_vit(spec, 224)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=224, **kwargs)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b
    assert ours.num_prefix_tokens == theirs.num_prefix_tokens
    assert isinstance(ours.norm, nn.LayerNorm) and isinstance(theirs.norm, nn.LayerNorm)
    assert ours.norm.eps == theirs.norm.eps
    assert spec.download and spec.timm_name.split(".")[0] == timm_name


def test_backbones_command_lists_layout_pooling_and_download(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("mae_vitb16", "mocov3_vitb16", "dino_vitb16", "dinov2_vitb14", "dinov2_vitb14_reg", "ijepa_vith14",
                 "dinov3_vitb16"):
        assert name in out
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in out
    assert "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar" in out
    assert "mean_normed" in out
    ijepa = out[out.index("\nijepa_vith14 "):]
    assert "encoder:    the file's 'target_encoder'" in ijepa.split("\nijepa_vith14_context")[0]
    assert "encoder:    the file's 'encoder'" in ijepa[ijepa.index("\nijepa_vith14_context"):]


def test_misspelled_timm_name_gets_a_did_you_mean_from_timm(tmp_path, capsys):
    """As for gapt's registered names, the suggestion comes from timm's own model list."""
    import timm
    from gapt.model.preflight import ModelSettingsError, check_model_settings
    assert "vit_tiny_patch16_224" in timm.list_models() and not timm.is_model("vit_tinyy_patch16_224")
    hint = "unknown backbone 'vit_tinyy_patch16_224' (did you mean 'vit_tiny_patch16_224'?)"
    with pytest.raises(ModelSettingsError, match=re.escape(hint)):
        check_model_settings("vit_tinyy_patch16_224", None, 224, "gated", 1)
    with pytest.raises(ValueError, match=re.escape(hint)):
        build_model("vit_tinyy_patch16_224", num_classes=5)
    assert main(["train", "backbone=vit_tinyy_patch16_224", "weights=null", "data.format=shapes",
                 "data.name=count", "device=cpu", f"out={tmp_path / 'run'}"]) == 1
    assert hint in capsys.readouterr().err and not (tmp_path / "run").exists()
    # a registered name still wins (gapt's own), and a name far from everything gets no suggestion
    with pytest.raises(ModelSettingsError, match=re.escape("'mae_vitb61' (did you mean 'mae_vitb16'?)")):
        check_model_settings("mae_vitb61", None, 224, "gated", 1)
    with pytest.raises(ModelSettingsError, match=r"unknown backbone 'qqqqzzzz'; registered"):
        check_model_settings("qqqqzzzz", None, 224, "gated", 1)
