"""The PEFT baselines (SPEC §12.6), each against an independent reference: HF peft's own LoRA on the same timm
ViT, the formulas of AdaptFormer's and SSF's official code written out here, and BitFit's biases counted from
timm's module list."""
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from conftest import tiny_model

D, L, C, HEADS = 32, 4, 5, 2


def randomise(model, scale=0.2, seed=5):
    """Every trained tensor moved away from its initial value (LoRA's B and the adapters' W_up start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def frozen_state(model):
    """The backbone's frozen tensors under timm's own names (the wrappers' ``base_layer`` undone, parts left out)."""
    out = {}
    for name, p in model.backbone.named_parameters():
        if ".lora_" in name or name.endswith(("ssf_scale", "ssf_shift")) or ".adaptmlp." in name:
            continue
        out[name.replace(".base_layer", "")] = p.detach().clone()
    return out


def timm_vit_like(model):
    """The tiny backbone as an independent timm classifier (its own VisionTransformer, weights copied by name),
    pooled as gapt pools: MAE's mean -> timm's avg with the final norm as fc_norm; MoCo's CLS -> token."""
    mean = model.pooling == "mean"
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=L, num_heads=HEADS, qkv_bias=True,
                            num_classes=C, global_pool="avg" if mean else "token", fc_norm=mean,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6), dynamic_img_size=True)
    frozen = {("fc_norm." + k[5:]) if mean and k.startswith("norm.") else k: v for k, v in frozen_state(model).items()}
    frozen.update({"head.weight": model.head.weight.detach().clone(), "head.bias": model.head.bias.detach().clone()})
    missing, unexpected = vit.load_state_dict(frozen, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return vit.eval()


# -- LoRA against peft ---------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
def test_lora_equals_peft_lora_on_the_same_timm_vit(backbone, images):
    peft = pytest.importorskip("peft")
    model = tiny_model(backbone, method="lora", lora_rank=4, lora_alpha=8)
    reference = timm_vit_like(model)
    with torch.no_grad():  # B = 0 at the start: the LoRA model is the frozen model
        assert torch.allclose(model(images), reference(images), atol=1e-5)
    randomise(model)
    peft_model = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    with torch.no_grad():  # gapt's A, B and head copied into peft's own layers by their peft names
        for i, blk in enumerate(model.backbone.blocks):
            layer = peft_model.base_model.model.blocks[i].attn.qkv
            layer.lora_A["default"].weight.copy_(blk.attn.qkv.lora_A.weight)
            layer.lora_B["default"].weight.copy_(blk.attn.qkv.lora_B.weight)
        head = peft_model.base_model.model.head.modules_to_save["default"]
        head.weight.copy_(model.head.weight)
        head.bias.copy_(model.head.bias)
        peft_model.eval()
        torch.testing.assert_close(model(images), peft_model(images), rtol=1e-5, atol=1e-5)
    assert model.part("lora").rank == 4 and model.num_tuned() == L * 4 * (D + 3 * D) + C * D + C


def test_lora_init_is_peft_init():
    model = tiny_model(method="lora", lora_rank=8)
    qkv = model.backbone.blocks[0].attn.qkv
    assert torch.equal(qkv.lora_B.weight, torch.zeros(3 * D, 8))
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=sqrt(5)) on a (r, D) weight: U(-1/sqrt(D), 1/sqrt(D))
    assert qkv.lora_A.weight.abs().max() <= bound and qkv.lora_A.weight.abs().max() > 0.7 * bound
    assert {n for n in model.tuned_parameters() if "lora" in n} == {
        f"backbone.blocks.{i}.attn.qkv.lora_{ab}.weight" for i in range(L) for ab in "AB"}
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if "lora" not in n)


def test_lora_on_q_and_v_is_the_fused_weight_update_written_out(images):
    model = randomise(tiny_model(method="lora", lora_rank=2, lora_alpha=6, lora_targets="q,v"))
    plain = tiny_model(method="linear")
    with torch.no_grad():
        plain.head.load_state_dict(model.head.state_dict())
        plain.backbone.load_state_dict(frozen_state(model))
        for blk, ref in zip(model.backbone.blocks, plain.backbone.blocks):
            qkv = blk.attn.qkv
            scale = 6 / 2
            # W_qkv' = W + [s B_q A_q ; 0 ; s B_v A_v]: q rows 0..D, k rows D..2D untouched, v rows 2D..3D
            ref.attn.qkv.weight[:D] += scale * qkv.lora_B["q"].weight @ qkv.lora_A["q"].weight
            ref.attn.qkv.weight[2 * D:] += scale * qkv.lora_B["v"].weight @ qkv.lora_A["v"].weight
        torch.testing.assert_close(model(images), plain(images), rtol=1e-5, atol=1e-5)
    assert model.tuned_counts()["lora"] == L * 2 * (2 * D + 2 * D)


# -- AdaptFormer: models/adapter.py::Adapter + custom_modules.py::Block (parallel), transcribed ------------
def adaptformer_reference(model, images):
    vit = model.backbone
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for blk in vit.blocks:
        x = x + blk.attn(blk.norm1(x))                       # x = x + drop_path(attn(norm1(x)))
        ad = blk.adaptmlp
        down = F.relu(x @ ad.down_proj.weight.T + ad.down_proj.bias)          # dropout: off in eval
        adapt_x = (down @ ad.up_proj.weight.T + ad.up_proj.bias) * 0.1        # up = up_proj(down); up * scale
        residual = x
        x = blk.mlp(blk.norm2(x))                             # drop_path(mlp(norm2(x)))
        x = x + adapt_x                                       # parallel: x + adapt_x
        x = residual + x
    return model.head(vit.norm(x[:, 1:].mean(1)))


def test_adaptformer_equals_the_official_block_written_out(images):
    model = tiny_model(method="adaptformer", adapter_dim=8)
    ad = model.backbone.blocks[0].adaptmlp
    assert torch.equal(ad.up_proj.weight, torch.zeros(D, 8)) and torch.equal(ad.up_proj.bias, torch.zeros(D))
    assert torch.equal(ad.down_proj.bias, torch.zeros(8)) and ad.down_proj.weight.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(images), adaptformer_reference(model, images), rtol=1e-5, atol=1e-5)
        randomise(model)
        torch.testing.assert_close(model(images), adaptformer_reference(model, images), rtol=1e-5, atol=1e-5)
    assert model.num_tuned() == L * (D * 8 + 8 + 8 * D + D) + C * D + C
    model.train()  # the adapter's dropout runs in training, the backbone stays in eval mode
    assert ad.training and not model.backbone.blocks[0].mlp.training
    torch.manual_seed(0)
    assert not torch.allclose(model(images), model(images))


# -- SSF: models/vision_transformer.py (ssf_ada after 8 places), transcribed -----------------------------------
def ssf_reference(model, images):
    """dongzelian/SSF's forward with tuning_mode='ssf'; frozen tensors read from the wrapped timm layers."""
    vit = model.backbone
    ssf = lambda x, m: x * m.ssf_scale + m.ssf_shift               # noqa: E731  ssf_ada on the last dim
    base = lambda m: m.base_layer                                   # noqa: E731
    ln = lambda x, m: F.layer_norm(x, (D,), base(m).weight, base(m).bias, 1e-6)  # noqa: E731
    lin = lambda x, m: x @ base(m).weight.T + base(m).bias          # noqa: E731
    proj = vit.patch_embed.proj
    x = F.conv2d(images, base(proj).weight, base(proj).bias, stride=8).flatten(2).transpose(1, 2)
    x = ssf(x, proj)                                                 # PatchEmbed: after proj + flatten
    B = x.shape[0]
    x = torch.cat([vit.cls_token.expand(B, -1, -1), x], 1) + vit.pos_embed
    for blk in vit.blocks:
        h = ssf(ln(x, blk.norm1), blk.norm1)                         # Block: ssf_ada(norm1(x))
        qkv = ssf(lin(h, blk.attn.qkv), blk.attn.qkv)                # Attention: ssf_ada(qkv(x))
        q, k, v = qkv.reshape(B, -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (D // HEADS) ** -0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, -1, D)
        x = x + ssf(lin(a, blk.attn.proj), blk.attn.proj)            # ssf_ada(proj(x))
        h = ssf(ln(x, blk.norm2), blk.norm2)                         # ssf_ada(norm2(x))
        h = F.gelu(ssf(lin(h, blk.mlp.fc1), blk.mlp.fc1))            # Mlp: ssf_ada(fc1(x)), then act
        x = x + ssf(lin(h, blk.mlp.fc2), blk.mlp.fc2)                # ssf_ada(fc2(x))
    # forward_features: ssf_ada(norm(x)); gapt's MAE pooling (SPEC §1) takes the mean before the norm
    feat = ssf(ln(x[:, 1:].mean(1), vit.norm), vit.norm) if model.pooling == "mean" else ssf(ln(x, vit.norm), vit.norm)[:, 0]
    return feat @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
def test_ssf_equals_the_official_forward_written_out(backbone, images):
    model = tiny_model(backbone, method="ssf")
    with torch.no_grad():
        torch.testing.assert_close(model(images), ssf_reference(model, images), rtol=1e-5, atol=1e-5)
    names = [n for n in model.tuned_parameters() if "ssf_scale" in n]
    assert len(names) == 1 + 6 * L + 1  # patch projection, 6 per block, final norm: SSF's 8 places
    per_block = D + 3 * D + D + D + 4 * D + D
    assert model.num_tuned() == 2 * (D + L * per_block + D) + C * D + C


def test_ssf_init_is_normal_around_one_and_zero():
    model = tiny_model("test_mae_tiny", method="ssf")
    scales = torch.cat([p.flatten() for n, p in model.tuned_parameters().items() if "ssf_scale" in n])
    shifts = torch.cat([p.flatten() for n, p in model.tuned_parameters().items() if "ssf_shift" in n])
    assert abs(scales.mean().item() - 1) < 0.005 and abs(scales.std().item() - 0.02) < 0.003
    assert abs(shifts.mean().item()) < 0.005 and abs(shifts.std().item() - 0.02) < 0.003
    groups = model.param_groups(weight_decay=0.05)  # gamma and beta: no weight decay (SSF's optimizer)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(model.head.weight), id(model.head.bias)}


# -- BitFit: every bias, counted from timm's module list -------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
def test_bitfit_trains_every_bias_of_the_backbone_and_the_head(backbone, images):
    model = tiny_model(backbone, method="bitfit")
    biased = (nn.Linear, nn.LayerNorm, nn.Conv2d)
    modules = [m for m in model.backbone.modules() if isinstance(m, biased) and m.bias is not None]
    # patch projection, norm1, qkv, proj, norm2, fc1, fc2 per block, final norm
    assert len(modules) == 1 + 6 * L + 1
    assert model.num_tuned() == sum(m.bias.numel() for m in modules) + C * D + C
    assert {id(p) for p in model.tuned_parameters().values()} == \
        {id(m.bias) for m in modules} | {id(model.head.weight), id(model.head.bias)}
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.train()
    opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=0.1)
    model(images).logsumexp(1).sum().backward()
    opt.step()
    changed = {n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("bias" in n for n in changed)
