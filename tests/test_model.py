"""The method's equations (SPEC §1-3), checked numerically on tiny ViTs."""
import math

import pytest
import torch
import torch.nn.functional as F

from gapt import build_model, selection_ratio
from gapt.model.prompted import prompt_init_bound

from conftest import tiny_model

D, L, NP, C = 32, 4, 3, 5


def copy_tuned(src, dst):
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name in dict(src.named_parameters()) and not name.startswith("backbone."):
                p.copy_(dict(src.named_parameters())[name])
    return dst


# -- shapes and trainable sets --------------------------------------------------------------
EXPECTED_TRAINABLE = {
    "linear": {"head.weight": (C, D), "head.bias": (C,)},
    "vpt-shallow": {"prompt_embeddings": (1, NP, D), "head.weight": (C, D), "head.bias": (C,)},
    "vpt-at-block": {"prompt_embeddings": (1, NP, D), "head.weight": (C, D), "head.bias": (C,)},
    "vpt-deep": {"prompt_embeddings": (1, NP, D), "deep_prompt_embeddings": (L - 1, NP, D),
                 "head.weight": (C, D), "head.bias": (C,)},
    "gated": {"prompt_embeddings": (1, NP, D), "gate_logits": (L - 1,), "head.weight": (C, D), "head.bias": (C,)},
}


@pytest.mark.parametrize("method", list(EXPECTED_TRAINABLE))
@pytest.mark.parametrize("temperature", [False, True])
def test_forward_shape_and_trainable_set(method, temperature, images):
    if temperature and method == "linear":
        with pytest.raises(ValueError, match="learn_temperature needs a prompt method"):
            tiny_model(method=method, learn_temperature=True)
        return
    kw = {"insert_at_block": 2} if method == "vpt-at-block" else {}
    model = tiny_model(method=method, learn_temperature=temperature, **kw)
    assert model(images).shape == (3, C)
    expected = dict(EXPECTED_TRAINABLE[method])
    if temperature:
        expected["temperature"] = (L,)
    got = {n: tuple(p.shape) for n, p in model.tuned_parameters().items()}
    assert got == expected
    assert model.num_tuned() == sum(math.prod(s) for s in expected.values())


def test_full_trains_everything_but_fixed_embeddings():
    model = tiny_model("test_moco_tiny", method="full")
    names = set(model.tuned_parameters())
    assert "backbone.blocks.0.attn.qkv.weight" in names and "head.weight" in names
    assert "backbone.pos_embed" not in names  # MoCo's sin-cos embedding is fixed
    assert model.num_tuned() == sum(p.numel() for p in model.parameters()) - model.backbone.pos_embed.numel()


def test_initialisation_follows_spec():
    model = tiny_model(method="vpt-deep", num_prompts=50)
    bound = math.sqrt(6 / (3 * 8 * 8 + D))
    assert prompt_init_bound((8, 8), D) == pytest.approx(bound)
    for p in (model.prompt_embeddings, model.deep_prompt_embeddings):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    assert torch.allclose(model.head.bias, torch.full((C,), -math.log(99)))
    assert model.head.weight.std().item() == pytest.approx(math.sqrt(2 / C), rel=0.35)  # kaiming fan_out
    gated = tiny_model(method="gated", gate_init=7.0, learn_temperature=True)
    assert torch.equal(gated.gate_logits, torch.full((L - 1,), -7.0))
    assert torch.equal(gated.temperature, torch.ones(L))


# -- SPEC identities ------------------------------------------------------------------------
def test_all_gates_one_equals_vpt_shallow(images):
    shallow = tiny_model(method="vpt-shallow")
    gated = copy_tuned(shallow, tiny_model(method="gated"))
    with torch.no_grad():
        gated.gate_logits.fill_(100.0)  # sigmoid(100) == 1 in float32
    assert torch.allclose(gated(images), shallow(images), atol=1e-6)


def test_vpt_at_block_one_equals_shallow(images):
    shallow = tiny_model(method="vpt-shallow")
    at1 = copy_tuned(shallow, tiny_model(method="vpt-at-block", insert_at_block=1))
    assert torch.allclose(at1(images), shallow(images), atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_vpt_at_block_k_runs_first_blocks_prompt_free(k, images):
    model = tiny_model(method="vpt-at-block", insert_at_block=k)
    vit = model.backbone
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        for blk in vit.blocks[:k - 1]:
            x = blk(x)
        x = torch.cat([x[:, :1], model.prompt_embeddings.expand(3, -1, -1), x[:, 1:]], dim=1)
        for blk in vit.blocks[k - 1:]:
            x = blk(x)
        expected = model.head(vit.norm(x[:, 1:].mean(1)))
    assert torch.allclose(model(images), expected, atol=1e-5)


def test_temperature_one_equals_plain_attention(images):
    plain = tiny_model(method="gated")
    shaped = copy_tuned(plain, tiny_model(method="gated", learn_temperature=True))
    assert torch.allclose(shaped(images), plain(images), atol=1e-5)


def test_gate_zero_passes_prompt_through_unchanged(images):
    model = tiny_model(method="gated")
    with torch.no_grad():
        model.gate_logits.fill_(-100.0)  # g == 0 (to float precision)
        _, outs = model.run_blocks(model.embed(images), collect=range(1, L))
    for block in range(1, L):
        prompts = outs[block][:, 1:1 + NP]
        assert torch.allclose(prompts, model.prompt_embeddings.expand(3, -1, -1), atol=1e-6), block


def test_temperature_is_projected_outside_autograd(images):
    model = tiny_model(method="gated", learn_temperature=True)
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([-3.0, 0.001, 5.0, 100.0]))
    model.train()
    model(images).sum().backward()
    assert torch.equal(model.temperature.detach(), torch.tensor([0.01, 0.01, 5.0, 10.0]))
    assert model.temperature.grad is not None and torch.isfinite(model.temperature.grad).all()
    assert model.temperature.grad.abs().sum() > 0  # a clamp in the graph would zero clamped grads


def test_selection_ratio_matches_hand_computation():
    model = tiny_model(method="gated", learn_temperature=True)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    g = [1 / (1 + math.exp(-v)) for v in (-1.0, 0.5, 2.0)]
    w = [g[0] * (1 - g[1]) * (1 - g[2]), g[1] * (1 - g[2]), g[2]]
    left = (1 - g[0]) * (1 - g[1]) * (1 - g[2])
    out = selection_ratio(model)
    assert out["gate"] == pytest.approx(g)
    assert out["block_weight"] == pytest.approx(w)
    assert out["selection_ratio"] == pytest.approx([x / sum(w) for x in w])
    assert out["inserted_prompt_weight"] == pytest.approx(left)
    assert sum(out["block_weight"]) + out["inserted_prompt_weight"] == pytest.approx(1.0)
    assert sum(out["selection_ratio"]) == pytest.approx(1.0)
    assert out["temperature"] == [1.0] * L
    with pytest.raises(ValueError, match="needs a gated model"):
        selection_ratio(tiny_model(method="vpt-shallow"))


def test_backbone_frozen_and_in_eval_mode(images):
    model = tiny_model(method="gated", learn_temperature=True)
    model.train()
    assert model.training and not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert model.prompt_dropout.training
    model(images).logsumexp(1).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.tuned_parameters().values())


def test_prompt_dropout_masks_per_sample_in_training_only(images):
    model = tiny_model(method="vpt-shallow", prompt_dropout=0.5)
    same = images[:1].expand(4, -1, -1, -1)
    assert torch.allclose(model(same)[0], model(same)[3])  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    out = model(same)
    assert not torch.allclose(out[0], out[1])  # a different mask per sample


# -- a hand-written forward of SPEC §2-3, independent of gapt's code --------------------------
def reference_forward(model, images, method, attention_sink=None):
    """Plain equations: explicit softmax(Q K^T d^-1/2 / tau), prompts spliced per block
    (each block's attention probabilities appended to ``attention_sink`` if given)."""
    vit = model.backbone
    B = images.shape[0]
    ln = lambda x, m: F.layer_norm(x, (D,), m.weight, m.bias, 1e-6)
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(B, -1, -1), x], 1) + vit.pos_embed
    P = model.prompt_embeddings.expand(B, -1, -1)
    x = torch.cat([x[:, :1], P, x[:, 1:]], 1)
    tau = model.temperature if model.temperature is not None else torch.ones(L)
    for l, blk in enumerate(vit.blocks):
        if method == "vpt-deep" and l > 0:
            x = torch.cat([x[:, :1], model.deep_prompt_embeddings[l - 1].expand(B, -1, -1), x[:, 1 + NP:]], 1)
        prompt_in = x[:, 1:1 + NP]
        h = ln(x, blk.norm1)
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv.reshape(B, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5 / tau[l], dim=-1)
        if attention_sink is not None:
            attention_sink.append(attn)
        a = (attn @ v).transpose(1, 2).reshape(B, -1, D)
        x = x + a @ blk.attn.proj.weight.T + blk.attn.proj.bias
        h = ln(x, blk.norm2)
        h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        x = x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        if method == "gated" and l < L - 1:
            g = torch.sigmoid(model.gate_logits[l])
            x = torch.cat([x[:, :1], g * x[:, 1:1 + NP] + (1 - g) * prompt_in, x[:, 1 + NP:]], 1)
    if model.pooling == "mean":
        feat = ln(x[:, 1:].mean(1), vit.norm)
    else:
        feat = ln(x, vit.norm)[:, 0]
    return feat @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
@pytest.mark.parametrize("method", ["gated", "vpt-shallow", "vpt-deep"])
def test_model_equals_hand_written_reference(backbone, method, images):
    model = tiny_model(backbone, method=method, learn_temperature=True)
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.5, 2.0, 1.3, 0.7]))
        if model.gate_logits is not None:
            model.gate_logits.copy_(torch.tensor([-1.0, 0.3, 2.0]))
        expected = reference_forward(model, images, method)
    assert torch.allclose(model(images), expected, atol=1e-5)


def test_attention_maps_are_softmax_with_temperature(images):
    model = tiny_model(method="gated", learn_temperature=True)
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.5, 2.0, 1.3, 0.7]))
        model.gate_logits.copy_(torch.tensor([-1.0, 0.3, 2.0]))
        expected = []
        reference_forward(model, images, "gated", attention_sink=expected)
    maps = model.attention_maps(images)
    assert len(maps) == L and maps[0].shape == (3, 2, 1 + NP + 16, 1 + NP + 16)
    for block, (got, want) in enumerate(zip(maps, expected)):  # softmax(Q K^T d^-1/2 / tau_l), by hand
        assert torch.allclose(got, want, atol=1e-6), block


def test_frozen_features_cache_gives_same_logits(images):
    for method, k in [("vpt-at-block", 3), ("linear", 1)]:
        model = tiny_model(method=method, insert_at_block=k)
        prefix = model.frozen_features(images)
        assert torch.allclose(model.forward_from_frozen(prefix), model(images), atol=1e-6)
    assert tiny_model(method="vpt-at-block", insert_at_block=3).frozen_leading_blocks == 2
    assert tiny_model(method="vpt-at-block", insert_at_block=3, learn_temperature=True).frozen_leading_blocks == 0


def test_grad_checkpointing_gives_same_gradients(images):
    a = tiny_model(method="gated", learn_temperature=True, prompt_dropout=0.0)
    b = copy_tuned(a, tiny_model(method="gated", learn_temperature=True, prompt_dropout=0.0))
    b.grad_checkpointing = True
    for m in (a, b):
        m.train()
        m(images).square().sum().backward()
    for n, p in a.tuned_parameters().items():
        assert torch.allclose(p.grad, b.tuned_parameters()[n].grad, atol=1e-6), n


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown method 'vpt'; valid: \['linear', 'full'"):
        tiny_model(method="vpt")
    with pytest.raises(ValueError, match="unknown backbone 'mae_vitz'.*valid: .*mae_vitb16"):
        build_model("mae_vitz")
    with pytest.raises(ValueError, match=r"insert_at_block=9 is outside the backbone's blocks 1..4"):
        tiny_model(method="vpt-at-block", insert_at_block=9)
    with pytest.raises(ValueError, match="needs method='vpt-at-block'"):
        tiny_model(method="gated", insert_at_block=2)
    with pytest.raises(ValueError, match="needs num_prompts >= 1"):
        tiny_model(method="gated", num_prompts=0)


def test_gate_count_follows_depth():
    from gapt.model.backbones import BackboneSpec, register_backbone
    register_backbone(BackboneSpec("test_deep7", dict(patch_size=8, embed_dim=32, depth=7, num_heads=2,
                                                       qkv_bias=True), "mean", "mae", image_size=32))
    model = tiny_model("test_deep7", method="gated", learn_temperature=True)
    assert model.gate_logits.shape == (6,) and model.temperature.shape == (7,)
