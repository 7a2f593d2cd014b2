"""The method layer as parts: compositions against hand-written references, the rules that refuse a
composition (naming both parts), the hook points a new part plugs into, counts, groups and caches."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_model
from gapt.config import ConfigError, load_config
from gapt.model.parts import Part
from test_model import reference_forward
from test_parts_peft import frozen_state, randomise

D, L, C, NP = 32, 4, 5, 3


def test_gated_prompts_and_temperatures_on_a_lora_backbone_equal_the_equations(images):
    """gated + temperature (SPEC §2-3) written out by hand on a backbone whose qkv is W + (alpha / r) B A."""
    model = randomise(tiny_model(method="gated+lora", learn_temperature=True, lora_rank=2, lora_alpha=4))
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.5, 2.0, 1.3, 0.7]))
        model.gate_logits.copy_(torch.tensor([-1.0, 0.3, 2.0]))
        plain = tiny_model(method="gated", learn_temperature=True)  # the reference reads plain timm weights
        plain.backbone.load_state_dict(frozen_state(model))
        for name in ("prompt_embeddings", "gate_logits", "temperature", "head.weight", "head.bias"):
            plain.get_parameter(name).copy_(model.get_parameter(name))
        for blk, ref in zip(model.backbone.blocks, plain.backbone.blocks):
            ref.attn.qkv.weight += 2.0 * blk.attn.qkv.lora_B.weight @ blk.attn.qkv.lora_A.weight
        expected = reference_forward(plain, images, "gated")
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    assert model.method == "gated+lora"
    assert set(model.tuned_counts()) == {"prompts", "gates", "temperature", "lora", "head"}


def test_order_of_names_does_not_matter_and_is_recorded_once():
    assert tiny_model(method="lora+gated").method == "gated+lora"
    assert load_config(None, ["method=ssf+vpt-deep"]).method == "vpt-deep+ssf"


@pytest.mark.parametrize("method,both", [
    ("gated+vpt-deep", ("gated", "vpt-deep")), ("vpt-shallow+vpt-at-block", ("vpt-shallow", "vpt-at-block")),
    ("full+lora", ("full", "lora")), ("bitfit+full", ("bitfit", "full")), ("linear+ssf", ("linear", "ssf"))])
def test_impossible_compositions_name_both_parts_before_any_work(method, both):
    with pytest.raises(ValueError) as e:
        tiny_model(method=method)
    assert all(f"'{n}'" in str(e.value) for n in both)
    with pytest.raises(ConfigError, match="config key 'method'") as e:
        load_config(None, [f"method={method}"])
    assert all(f"'{n}'" in str(e.value) for n in both)


def test_part_settings_without_the_part_and_bad_values_are_errors():
    with pytest.raises(ValueError, match="lora_rank=4 needs the lora part: use method=gated\\+lora"):
        tiny_model(method="gated", lora_rank=4)
    with pytest.raises(ConfigError, match="config key 'adapter_dim'"):
        load_config(None, ["method=vpt-deep", "adapter_dim=8"])
    with pytest.raises(ConfigError, match="config key 'lora_targets'"):
        load_config(None, ["method=lora", "lora_targets=k,v"])
    with pytest.raises(ValueError, match="learn_temperature needs a prompt method"):
        tiny_model(method="lora", learn_temperature=True)
    assert load_config(None, ["method=lora", "lora_targets=qv"]).lora_targets == "q,v"
    with pytest.raises(ValueError, match="not supported by it yet"):
        from gapt.model.parts.base import check_timm_vit
        check_timm_vit(type("Eva", (nn.Module,), {})(), "lora")


def test_counts_groups_and_caches_follow_the_parts():
    model = tiny_model(method="vpt-deep+ssf+bitfit")
    counts = model.tuned_counts()
    assert sum(counts.values()) == model.num_tuned() and counts["prompts"] == L * NP * D
    assert counts["ssf"] == 2 * (D + L * 11 * D + D)  # gamma and beta at SSF's 8 places
    assert counts["bias"] == D + L * 11 * D + D  # the biases inside SSF's wrappers are BitFit's
    assert [g["weight_decay"] for g in model.param_groups(0.1)] == [0.1, 0.0]
    assert len(tiny_model(method="gated").param_groups(0.1)) == 1  # the paper's methods: one group, as before
    assert tiny_model(method="vpt-at-block", insert_at_block=3).frozen_leading_blocks == 2
    assert tiny_model(method="vpt-at-block+lora", insert_at_block=3).frozen_leading_blocks == 0
    assert tiny_model(method="linear").head_only and not tiny_model(method="bitfit").head_only
    assert tiny_model(method="gated").prompt_insertions() == [("prompt_embeddings", 0, 1)]


@pytest.mark.parametrize("method", ["lora", "adaptformer", "ssf", "gated+lora"])
def test_grad_checkpointing_gives_same_gradients(method, images):
    kw = {"adapter_dropout": 0.0} if method == "adaptformer" else {}
    a = randomise(tiny_model(method=method, prompt_dropout=0.0, **kw))
    b = randomise(tiny_model(method=method, prompt_dropout=0.0, **kw))
    b.grad_checkpointing = True
    for m in (a, b):
        m.train()
        m(images).square().sum().backward()
    for n, p in a.tuned_parameters().items():
        assert torch.allclose(p.grad, b.tuned_parameters()[n].grad, atol=1e-5), n


# -- the hook points a new part plugs into ---------------------------------------------------------
class ExtraKeys(Part):
    """A toy E2VPT-like part: ``n`` learned key/value tokens per block, attended to, never output."""
    name = kind = "extra-keys"
    hooks = ("block",)

    def attach(self, model):
        heads, dh = model.backbone.blocks[0].attn.num_heads, D // model.backbone.blocks[0].attn.num_heads
        model.extra_k = nn.Parameter(torch.randn(model.depth, heads, 2, dh))
        model.extra_v = nn.Parameter(torch.randn(model.depth, heads, 2, dh))

    def block(self, model, i, call, step):
        def extra(k, v):
            B = k.shape[0]
            return (torch.cat([k, model.extra_k[i].expand(B, -1, -1, -1)], 2),
                    torch.cat([v, model.extra_v[i].expand(B, -1, -1, -1)], 2))
        call.extra_kv = extra


class Penalty(Part):
    """A toy loss part (DA-VPT's metric loss would read what a block saw): a constant 7 added to the loss."""
    name = kind = "penalty"
    hooks = ("begin",)

    def begin(self, model, step):
        step.losses.append(torch.tensor(7.0))


def test_extra_keys_and_values_hook_equals_attention_written_out(images):
    model = tiny_model(method="linear")
    model.add_part(ExtraKeys(model.settings))
    vit = model.backbone
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        B = x.shape[0]
        for i, blk in enumerate(vit.blocks):
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).reshape(B, -1, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            k = torch.cat([k, model.extra_k[i].expand(B, -1, -1, -1)], 2)
            v = torch.cat([v, model.extra_v[i].expand(B, -1, -1, -1)], 2)
            a = (torch.softmax(q @ k.transpose(-1, -2) * (D // 2) ** -0.5, -1) @ v).transpose(1, 2).reshape(B, -1, D)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp(blk.norm2(x))
        expected = model.head(vit.norm(x[:, 1:].mean(1)))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    assert model.frozen_leading_blocks == 0 and "extra_k" in model.tuned_parameters()


def test_loss_terms_reach_the_training_loss(images):
    from torch.utils.data import DataLoader, TensorDataset
    from gapt.engine.schedule import LRSchedule
    from gapt.engine.trainer import train_one_epoch
    losses = {}
    for with_penalty in (False, True):
        model = tiny_model(method="vpt-shallow", prompt_dropout=0.0)
        if with_penalty:
            model.add_part(Penalty(model.settings))
        loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 2])), batch_size=3)
        opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=0.0)
        stats = train_one_epoch(model, model, loader, opt, LRSchedule(0.0, 1, 0, 1), 0, torch.device("cpu"), None)
        losses[with_penalty] = stats["loss"]
        assert len(model.extra_losses) == int(with_penalty)
    assert losses[True] == pytest.approx(losses[False] + 7.0)
    ce = F.cross_entropy(tiny_model(method="vpt-shallow", prompt_dropout=0.0)(images), torch.tensor([0, 1, 2]))
    assert losses[False] == pytest.approx(ce.item(), rel=1e-5)
