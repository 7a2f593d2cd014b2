"""E2VPT's forward (SPEC §12.4) against a transcription of its official code, run on the same tiny timm ViT.

Transcribed from ChengHan111/E2VPT @ 7a66e75e (written out here, not imported): ``Attention_VK.forward`` and
``Block_VK.forward`` (src/models/vit_backbones/vit_mae_changeVK.py; SHARE_PARAM_KV, LAYER_BEHIND, QKV_proj
Identity, P_VK.DROPOUT 0) and ``PromptedVisionTransformerMAE_Prompt_VK.incorporate_prompt / forward_features``
(src/models/vit_prompt/vit_mae_prompt_VK.py; DEEP_P, MASK_CLS_TOKEN with both masks, VIT_POOL_TYPE "original").
The pruning selection is in tests/test_e2vpt_prune.py.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model

D, L, HEADS = 32, 4, 2
DH = D // HEADS


# -- the official code, transcribed ------------------------------------------------------------------
class OfficialAttentionVK(nn.Module):
    """E2VPT src/models/vit_backbones/vit_mae_changeVK.py::Attention_VK.forward (SHARE_PARAM_KV=True,
    LAYER_BEHIND=True), on the qkv / proj of a timm Attention."""

    def __init__(self, timm_attn, deep_QKV_embeddings):
        super().__init__()
        self.num_heads = timm_attn.num_heads
        self.scale = (timm_attn.qkv.weight.shape[1] // self.num_heads) ** -0.5
        self.qkv, self.proj = timm_attn.qkv, timm_attn.proj
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.deep_QKV_embeddings = deep_QKV_embeddings
        self.QKV_proj = nn.Identity()
        self.QKV_dropout = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        B = q.shape[0]
        k = torch.cat((self.QKV_dropout(self.QKV_proj(self.deep_QKV_embeddings).expand(B, -1, -1, -1)), k), dim=2)
        v = torch.cat((self.QKV_dropout(self.QKV_proj(self.deep_QKV_embeddings).expand(B, -1, -1, -1)), v), dim=2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class OfficialBlockVK(nn.Module):
    """vit_mae_changeVK.py::Block_VK.forward (drop_path inactive: the backbone runs in eval mode)."""

    def __init__(self, timm_block):
        super().__init__()
        self.norm1, self.norm2, self.mlp = timm_block.norm1, timm_block.norm2, timm_block.mlp
        self.attn = OfficialAttentionVK(timm_block.attn, timm_block.attn.deep_QKV_embeddings)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class OfficialPromptVK:
    """vit_mae_prompt_VK.py::PromptedVisionTransformerMAE_Prompt_VK.incorporate_prompt / forward_features."""

    def __init__(self, model, mask_cls_token=True, fc_norm=None, prompt_dropout=None):
        vit = model.backbone
        self.vit, self.blocks = vit, [OfficialBlockVK(b) for b in vit.blocks]
        self.prompt_embeddings, self.deep_prompt_embeddings = model.prompt_embeddings, model.deep_prompt_embeddings
        self.num_tokens_P = model.num_prompts
        self.prompt_dropout = prompt_dropout or model.prompt_dropout
        self.mask_cls_token = mask_cls_token
        if mask_cls_token:
            self.prompt_soft_tokens_mask_cls_token = model.prompt_soft_tokens_mask_cls_token
            self.prompt_soft_tokens_pieces_mask_cls_token = model.prompt_soft_tokens_pieces_mask_cls_token
            self.soft_token_chunks_num_cls_token = int(vit.embed_dim / 16)
        self.fc_norm = fc_norm or nn.LayerNorm(vit.embed_dim, eps=1e-6)

    def embeddings(self, x):
        B = x.shape[0]
        x = self.vit.patch_embed(x)
        if x.ndim == 4:  # timm's dynamic-size patch embedding keeps the grid; the official one flattens
            x = x.flatten(1, 2)
        cls_tokens = self.vit.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.vit.pos_embed
        x = self.vit.pos_drop(x)
        return x

    def incorporate_prompt(self, x):
        B = x.shape[0]
        x = self.embeddings(x)
        prompt_embeddings = self.prompt_dropout(self.prompt_embeddings.expand(B, -1, -1))
        if self.mask_cls_token is True:
            prompt_embeddings = prompt_embeddings * self.prompt_soft_tokens_pieces_mask_cls_token.repeat(
                (1, self.soft_token_chunks_num_cls_token)).repeat(B, 1, 1)
            prompt_embeddings = prompt_embeddings * self.prompt_soft_tokens_mask_cls_token.view(-1, 1).repeat(
                1, prompt_embeddings.shape[2]).repeat(B, 1, 1)
        x = torch.cat((x[:, :1, :], prompt_embeddings, x[:, 1:, :]), dim=1)
        return x

    def forward_features(self, x):
        x = self.incorporate_prompt(x)
        B = x.shape[0]
        num_layers = len(self.blocks)
        for i in range(num_layers):
            if i == 0:
                x = self.blocks[i](x)
            else:
                deep_prompt_emb = self.prompt_dropout(self.deep_prompt_embeddings[i - 1].expand(B, -1, -1))
                if self.mask_cls_token is True:
                    deep_prompt_emb = deep_prompt_emb * self.prompt_soft_tokens_pieces_mask_cls_token.repeat(
                        (1, self.soft_token_chunks_num_cls_token)).repeat(B, 1, 1)
                    deep_prompt_emb = deep_prompt_emb * self.prompt_soft_tokens_mask_cls_token.view(-1, 1).repeat(
                        1, self.deep_prompt_embeddings.shape[2]).repeat(B, 1, 1)
                x = torch.cat((x[:, :1, :], deep_prompt_emb, x[:, (1 + self.num_tokens_P):, :]), dim=1)
                x = self.blocks[i](x)
        x = x[:, 1:, :].mean(dim=1)  # VIT_POOL_TYPE "original": global pool without cls token
        return self.fc_norm(x)


def randomised(model, seed=3, scale=0.3):
    """Every trained tensor (prompts, key-value prompts, learned masks, head) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def e2vpt(**kw):
    kw.setdefault("num_prompts", 3)
    kw.setdefault("kv_prompts", 2)
    kw.setdefault("pooling", "mean_fc_norm")
    return tiny_model(method="e2vpt", **kw)


# -- attention and whole forward ------------------------------------------------------------------------
def test_attention_with_kv_prompts_equals_attention_vk():
    from gapt.model.blocks import attention
    model = randomised(e2vpt())
    x = torch.randn(3, 1 + 3 + 16, D)
    part = model.part("kv_prompts")
    for i, blk in enumerate(model.backbone.blocks):
        from gapt.model.parts import BlockCall, Step
        call = BlockCall()
        part.block(model, i, call, Step(prefix=1))
        with torch.no_grad():
            ours = attention(blk.attn, x, extra_kv=call.extra_kv)
            theirs = OfficialAttentionVK(blk.attn, blk.attn.deep_QKV_embeddings)(x)
        assert ours.shape == x.shape  # queries stay the N tokens
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masks", ["learned", "fixed", "none"])
def test_e2vpt_equals_official_forward(masks, images):
    kw = {}
    if masks == "fixed":
        kw = dict(e2vpt_masked_tokens=[1], e2vpt_masked_pieces=[[0, 5, 15], [], [3]])
    model = randomised(e2vpt(e2vpt_masks=masks, **kw))
    if masks == "learned":  # trained gates: values other than 0 / 1
        assert model.prompt_soft_tokens_mask_cls_token.requires_grad
        assert not torch.equal(model.prompt_soft_tokens_mask_cls_token, torch.ones(3))
    with torch.no_grad():
        ours = model.forward_features(images)
        theirs = OfficialPromptVK(model, mask_cls_token=masks != "none").forward_features(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_train_mode_dropout_then_masks(images):
    """Training mode, a deterministic non-linear stand-in for the prompt dropout shared by both: the masks
    multiply the prompts after the dropout, at every block (the same masks), as the official order."""
    class Squash(nn.Module):
        def forward(self, x):
            return torch.tanh(3 * x) + 0.1
    model = randomised(e2vpt(num_prompts=4))
    model.prompt_dropout = Squash()
    model.train()
    ours = model.forward_features(images)
    theirs = OfficialPromptVK(model, prompt_dropout=model.prompt_dropout).forward_features(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_moco_readout(images):
    model = randomised(tiny_model("test_moco_tiny", method="e2vpt", num_prompts=3, kv_prompts=2))
    official = OfficialPromptVK(model)
    with torch.no_grad():  # vit_moco_prompt_VK.py: the same blocks, then norm(x)[:, 0]
        x = official.incorporate_prompt(images)
        for i, blk in enumerate(official.blocks):
            if i > 0:
                p = model.deep_prompt_embeddings[i - 1].expand(x.shape[0], -1, -1)
                p = p * model.prompt_soft_tokens_pieces_mask_cls_token.repeat((1, D // 16))
                p = p * model.prompt_soft_tokens_mask_cls_token.view(-1, 1)
                x = torch.cat((x[:, :1], p, x[:, 1 + 3:]), dim=1)
            x = blk(x)
        theirs = model.backbone.norm(x)[:, 0]
        torch.testing.assert_close(model.forward_features(images), theirs, rtol=1e-5, atol=1e-5)


def test_pieces_are_strided():
    """Piece j covers dims j, j + 16, ...: zeroing piece 0 of token 0 zeroes exactly those dims of its prompt."""
    model = e2vpt(e2vpt_masks="fixed", e2vpt_masked_pieces=[[0], [], []])
    p = torch.ones(1, 3, D)
    out = model.part("prompts").transform(model, 0, p)
    zero = (out[0, 0] == 0).nonzero().flatten().tolist()
    assert zero == list(range(0, D, 16)) and torch.all(out[0, 1:] == 1)


# -- tensors, init, training --------------------------------------------------------------------------------
def test_tensors_names_shapes_init():
    model = e2vpt(num_prompts=3, kv_prompts=5)
    tuned = model.tuned_parameters()
    kv = {f"backbone.blocks.{i}.attn.deep_QKV_embeddings" for i in range(L)}
    assert set(tuned) == {"prompt_embeddings", "deep_prompt_embeddings", "prompt_soft_tokens_mask_cls_token",
                          "prompt_soft_tokens_pieces_mask_cls_token", "head.weight", "head.bias"} | kv
    assert tuple(model.prompt_soft_tokens_pieces_mask_cls_token.shape) == (3, 16)
    assert torch.equal(model.prompt_soft_tokens_mask_cls_token, torch.ones(3))
    bound = math.sqrt(6.0 / (5 * DH))  # kaiming_uniform_(a=0, fan_in = M_kv * dh, leaky_relu)
    thetas = torch.stack([model.get_parameter(k) for k in sorted(kv)])
    assert thetas.shape == (L, HEADS, 5, DH)
    assert thetas.abs().max() <= bound and thetas.abs().max() > 0.9 * bound
    vpt = math.sqrt(6.0 / (3 * 8 * 8 + D))
    assert model.deep_prompt_embeddings.abs().max() <= vpt
    counts = model.tuned_counts()
    assert counts["kv_prompts"] == L * HEADS * 5 * DH and counts["prompts"] == L * 3 * D + 3 + 3 * 16


def test_fixed_masks_are_frozen_and_zero():
    model = e2vpt(e2vpt_masks="fixed", e2vpt_masked_tokens=[0, 2], e2vpt_masked_pieces=[[1], [2, 3], []])
    assert not model.prompt_soft_tokens_mask_cls_token.requires_grad
    assert model.prompt_soft_tokens_mask_cls_token.tolist() == [0, 1, 0]
    r = model.prompt_soft_tokens_pieces_mask_cls_token
    assert r.sum() == 48 - 3 and r[0, 1] == 0 and r[1, 2] == 0 and r[1, 3] == 0
    assert "prompt_soft_tokens_mask_cls_token" not in model.tuned_parameters()


def test_learned_masks_get_gradients_and_weight_decay(images):
    model = randomised(e2vpt())
    model.train()
    (model(images) * torch.randn(3, 5)).sum().backward()
    assert model.prompt_soft_tokens_mask_cls_token.grad.abs().sum() > 0
    assert model.prompt_soft_tokens_pieces_mask_cls_token.grad.abs().sum() > 0
    assert all(g["weight_decay"] == 0.1 for g in model.param_groups(0.1))  # SGD decays the masks too


@pytest.mark.parametrize("kw,key", [(dict(e2vpt_masked_tokens=[1]), "e2vpt_masks=fixed"),
                                    (dict(e2vpt_masks="fixed", e2vpt_masked_tokens=[3]), "0..2"),
                                    (dict(e2vpt_masks="fixed", e2vpt_masked_pieces=[[16], [], []]), "0..15"),
                                    (dict(e2vpt_masks="fixed", e2vpt_masked_pieces=[[1]]), "one list per"),
                                    (dict(kv_prompts=0), "kv_prompts"), (dict(e2vpt_masks="pruned"), "unknown")])
def test_bad_mask_settings(kw, key):
    with pytest.raises(ValueError, match=key):
        e2vpt(**kw)


# -- composition ----------------------------------------------------------------------------------------------
def test_temperature_one_is_e2vpt_and_temperature_scales_the_kv_prompts_too(images):
    plain = randomised(e2vpt())
    tempered = e2vpt(learn_temperature=True)
    tempered.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(tempered(images), plain(images), rtol=1e-5, atol=1e-5)
        tempered.temperature.fill_(0.5)
        assert not torch.allclose(tempered(images), plain(images))


@pytest.mark.parametrize("method,other", [("e2vpt+gated", "gated"), ("e2vpt+vpt-shallow", "vpt-shallow"),
                                          ("e2vpt+vfpt", "vfpt")])
def test_impossible_compositions_name_both(method, other):
    with pytest.raises(ValueError) as e:
        tiny_model(method=method)
    assert "'e2vpt'" in str(e.value) and f"'{other}'" in str(e.value)


def test_e2vpt_with_lora_and_grad_checkpointing(images):
    model = randomised(tiny_model(method="e2vpt+lora", num_prompts=3, kv_prompts=2))
    model.train()
    torch.manual_seed(0)
    ref = model(images)
    model.grad_checkpointing = True
    torch.manual_seed(0)
    torch.testing.assert_close(model(images), ref)
    model(images).sum().backward()
    assert model.backbone.blocks[1].attn.deep_QKV_embeddings.grad is not None


def test_not_mergeable():
    import gapt
    from gapt.model.parts import NotMergeable
    with pytest.raises(NotMergeable, match="e2vpt"):
        gapt.merge(e2vpt())


# -- files ------------------------------------------------------------------------------------------------------
def official_checkpoint(model, masks=True):
    """E2VPT's trainer (fvcore Checkpointer: {"model": state_dict} of ViT(enc, head=MLP)): prompts, masks,
    per-block deep_QKV_embeddings inside enc's attention, the frozen MAE encoder with fc_norm (norm deleted)."""
    sd = {"head.last_layer.weight": model.head.weight.detach().clone(),
          "head.last_layer.bias": model.head.bias.detach().clone()}
    for name in ("prompt_embeddings", "deep_prompt_embeddings") + (
            ("prompt_soft_tokens_mask_cls_token", "prompt_soft_tokens_pieces_mask_cls_token") if masks else ()):
        sd["enc." + name] = getattr(model, name).detach().clone()
    for k, v in model.backbone.state_dict().items():
        if k.startswith("norm."):
            sd["enc.fc_" + k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
        else:
            sd["enc." + k] = v.clone()
    return {"model": sd}


@pytest.mark.parametrize("masks", ["learned", "fixed", "none"])
def test_official_checkpoint_loads(masks, tmp_path, images):
    kw = dict(e2vpt_masks=masks)
    if masks == "fixed":
        kw.update(e2vpt_masked_tokens=[2], e2vpt_masked_pieces=[[1, 2], [], [7]])
    source = randomised(e2vpt(**kw))
    path = tmp_path / "last_model.pth"
    torch.save(official_checkpoint(source, masks != "none"), path)
    target = e2vpt(seed=7, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target.load_tuned(str(path))
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_official_checkpoint_mask_mismatch_is_refused(tmp_path):
    from gapt.model.checkpoints import CheckpointError
    source = e2vpt(e2vpt_masks="fixed", e2vpt_masked_tokens=[2])
    torch.save(official_checkpoint(source), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="fixed masks"):
        e2vpt(e2vpt_masks="fixed", e2vpt_masked_tokens=[1]).load_tuned(str(tmp_path / "m.pth"))
    with pytest.raises(CheckpointError, match="e2vpt_masks=learned"):
        e2vpt(e2vpt_masks="none").load_tuned(str(tmp_path / "m.pth"))
    with pytest.raises(CheckpointError, match="kv_prompts"):
        e2vpt(kv_prompts=3, e2vpt_masks="fixed", e2vpt_masked_tokens=[2]).load_tuned(str(tmp_path / "m.pth"))


def test_gapt_tuned_file_keeps_fixed_masks_in_its_settings(tmp_path, images):
    from gapt.model.checkpoints import CheckpointError
    from gapt.model.tuned import read_tuned_metadata
    kw = dict(e2vpt_masks="fixed", e2vpt_masked_tokens=[0], e2vpt_masked_pieces=[[], [4], [5, 6]])
    source = randomised(e2vpt(**kw))
    source.save_tuned(str(tmp_path / "t.safetensors"))
    meta = read_tuned_metadata(str(tmp_path / "t.safetensors"))
    assert meta["e2vpt_masked_pieces"] == [[], [4], [5, 6]] and meta["kv_prompts"] == 2
    again = e2vpt(**kw).load_tuned(str(tmp_path / "t.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(images), source(images))
    with pytest.raises(CheckpointError, match="e2vpt_masked_tokens"):
        e2vpt(**{**kw, "e2vpt_masked_tokens": [1]}).load_tuned(str(tmp_path / "t.safetensors"))


# -- presets and grid ----------------------------------------------------------------------------------------------
# command.txt "ssl mae / ssl moco VTAB-1k" (ChengHan111/E2VPT @ 7a66e75e), typed here: task -> (NUM_TOKENS_P, NUM_TOKENS)
COMMAND_TXT = {"caltech101": (32, 5), "cifar": (5, 5), "dtd": (10, 5), "oxford_flowers102": (1, 1),
               "oxford_iiit_pet": (10, 5), "sun397": (10, 5), "svhn": (10, 5), "diabetic_retinopathy": (10, 5),
               "eurosat": (10, 5), "patch_camelyon": (10, 10), "resisc45": (10, 5), "clevr_count": (10, 5),
               "clevr_dist": (10, 5), "dmlab": (10, 5), "dsprites_loc": (5, 5), "dsprites_ori": (5, 5),
               "kitti": (10, 5), "smallnorb_azi": (10, 5), "smallnorb_ele": (10, 5)}


@pytest.mark.parametrize("backbone", ["mae_vitb16", "mocov3_vitb16"])
def test_e2vpt_presets_carry_command_txt(backbone):
    from gapt.config import load_config
    for task, (prompts, kv) in COMMAND_TXT.items():
        cfg = load_config(f"vtab/{backbone}/e2vpt/{task}")
        assert (cfg.method, cfg.num_prompts, cfg.kv_prompts, cfg.e2vpt_masks) == ("e2vpt", prompts, kv, "learned")
        assert (cfg.train.batch_size, cfg.train.optimizer, cfg.train.schedule, cfg.prompt_dropout) == \
            (128, "sgd", "cosine_epoch", 0.1)
        assert cfg.pooling == ("mean_fc_norm" if backbone.startswith("mae") else "")
        assert not cfg.train.head_bias_decay
    for task in ("cub", "nabirds", "flowers", "dogs", "cars"):
        cfg = load_config(f"fgvc/{backbone}/e2vpt/{task}")
        assert (cfg.num_prompts, cfg.kv_prompts) == (5, 5)
        assert cfg.train.batch_size == (128 if backbone.startswith("mae") else 64)


def test_e2vpt_grid_is_the_tune_script_at_batch_128():
    from gapt.sweep.grid import build_grid
    grid = build_grid("e2vpt", [], {})
    assert [float(v) for v in grid["train.lr"]] == [x * 128 / 256 for x in (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)]
    assert [float(v) for v in grid["train.weight_decay"]] == [0.01, 0.001, 0.0001, 0.0]
