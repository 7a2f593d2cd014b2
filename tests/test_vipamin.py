"""prompt_init=vipamin against transcriptions of VIPAMIN's own scripts (SPEC §12.2).

Transcribed from iamjaekyun/vipamin @ ebce4e4: ``load_match.py``, ``load_match_deep.py``, ``load_orth.py``,
``load_orth_deep.py`` (the maths after the first batch is read), the random prompts and the forward of
``src/models/vit_prompt/vit_mae.py::PromptedVisionTransformer`` (``INITIATION="random"``, ``prepend``), and its
``INITIATION="vipamin"`` combination. ``torch_intermediate_layer_getter.IntermediateLayerGetter`` is written out
as forward hooks (``MidGetter``). Changes, and only these: the tiny model's sizes replace the hard-coded ViT-B
ones (batch 256 -> B, 12 heads -> H, 768 -> D, 196 patches -> 16, 12 blocks -> 4, the patch side 16 -> 8, and
``topk(cos, 128)`` -> ``topk(cos, 16)``: all the patches); ``.cuda()`` dropped; the images are passed in
(gapt's "first batch": ``randperm(n)`` seeded 0, the first B) and ``torch.manual_seed(0)`` is called right
before the random prompts and before the orthogonal draws, the streams gapt defines (the scripts seed once
before building a model, whose other random inits gapt cannot repeat); ``new_forward`` takes timm's
extra keyword arguments; timm's dynamic-size ``PatchEmbed`` output (B, H, W, D) is flattened to (B, N, D).
"""
import copy
import math
from functools import reduce
from operator import mul

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from conftest import tiny_model
from gapt.engine.prompt_init import init_prompts_vipamin

M, PATCHES, PATCH = 3, 16, 8


# -- transcription: IntermediateLayerGetter(model, return_layers, keep_output=False) -------------------
class MidGetter:
    def __init__(self, model, return_layers, keep_output=False):
        self.model, self.return_layers = model, return_layers

    def __call__(self, *args):
        outputs, handles = {}, []
        for name, module in self.model.named_modules():
            if name in self.return_layers:
                key = self.return_layers[name]
                handles.append(module.register_forward_hook(lambda m, i, o, key=key: outputs.__setitem__(key, o)))
        try:
            self.model(*args)
        finally:
            for h in handles:
                h.remove()
        return outputs, None


# -- transcription: vit_prompt/vit_mae.py (random prompts, prepend, eval mode) -------------------------
class PromptedVisionTransformer(nn.Module):
    def __init__(self, vit, num_tokens, deep):
        super().__init__()
        self.enc = vit
        self.num_tokens, self.deep = num_tokens, deep
        self.prompt_dropout = nn.Dropout(0.0)
        val = math.sqrt(6. / float(3 * reduce(mul, vit.patch_embed.patch_size, 1) + vit.embed_dim))  # noqa
        self.prompt_embeddings = nn.Parameter(torch.zeros(1, num_tokens, vit.embed_dim))
        nn.init.uniform_(self.prompt_embeddings.data, -val, val)
        if deep:
            self.deep_prompt_embeddings = nn.Parameter(torch.zeros(len(vit.blocks) - 1, num_tokens, vit.embed_dim))
            nn.init.uniform_(self.deep_prompt_embeddings.data, -val, val)

    def embeddings(self, x):
        B = x.shape[0]
        x = self.enc.patch_embed(x)
        x = x.flatten(1, 2) if x.ndim == 4 else x  # timm's dynamic-size PatchEmbed gives (B, H, W, D)
        cls_tokens = self.enc.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.enc.pos_embed
        x = self.enc.pos_drop(x)
        return x

    def incorporate_prompt(self, x):
        B = x.shape[0]
        x = self.embeddings(x)
        x = torch.cat((x[:, :1, :], self.prompt_dropout(self.prompt_embeddings.expand(B, -1, -1)), x[:, 1:, :]), dim=1)
        return x

    def forward(self, x):
        x = self.incorporate_prompt(x)
        if self.deep:
            B = x.shape[0]
            for i in range(len(self.enc.blocks)):
                if i == 0:
                    x = self.enc.blocks[i](x)
                else:
                    x = torch.cat((x[:, :1, :],
                                   self.prompt_dropout(self.deep_prompt_embeddings[i - 1].expand(B, -1, -1)),
                                   x[:, (1 + self.num_tokens):, :]), dim=1)
                    x = self.enc.blocks[i](x)
        else:
            for blk in self.enc.blocks:
                x = blk(x)
        return x


class FullModel(nn.Module):
    """cfg_for_full: the prompt-free ViT (``model.enc``)."""

    def __init__(self, vit):
        super().__init__()
        self.enc = vit

    def forward(self, x):
        return self.enc.forward_features(x)


# -- transcription: load_match.py / load_match_deep.py ------------------------------------------------
def load_match(model, inputs, ks):
    B, N, C, H = inputs.shape[0], 1 + M + PATCHES, model.enc.embed_dim, model.enc.blocks[0].attn.num_heads
    prompt_len = M
    return_layers = {}
    return_layers['enc.pos_drop'] = -1
    return_layers['enc.blocks.0.attn.qkv'] = 0
    melo = MidGetter(model, return_layers=return_layers, keep_output=False)
    with torch.no_grad():
        mid_outputs, _ = melo(inputs)
    output = mid_outputs[0]
    qkv = output.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    k = qkv[1].mean(1).mean(0)[1:, :]
    adj = nn.functional.normalize(k, p=2, dim=-1)
    cos = adj @ adj.transpose(-1, -2)
    cos.diagonal(dim1=-1, dim2=-2).fill_(-torch.inf)
    cos[:prompt_len, :prompt_len].fill_(-torch.inf)
    I = torch.topk(cos, PATCHES)[1][:prompt_len, :]  # noqa: E741
    X = mid_outputs[-1].mean(0)
    out = {}
    for k in ks:
        out[k] = torch.stack([X[idxs + 1 - prompt_len].mean(dim=0) for idxs in I[:, :k]]).unsqueeze(0)
    return out


def load_match_deep(model, inputs, ks):
    block_num = len(model.enc.blocks)
    B, N, C, H = inputs.shape[0], 1 + M + PATCHES, model.enc.embed_dim, model.enc.blocks[0].attn.num_heads
    prompt_len = M
    return_layers = {}
    return_layers['enc.pos_drop'] = -1
    for i in range(block_num):
        return_layers[f'enc.blocks.{i}.attn.qkv'] = 2 * i
        return_layers[f'enc.blocks.{i}'] = 2 * i + 1
    melo = MidGetter(model, return_layers=return_layers, keep_output=False)
    with torch.no_grad():
        mid_outputs, _ = melo(inputs)
    ret = {k: [] for k in ks}
    for block in range(block_num):
        output = mid_outputs[2 * block]
        qkv = output.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        k = qkv[1].mean(1).mean(0)[1:, :]
        adj = nn.functional.normalize(k, p=2, dim=-1)
        cos = adj @ adj.transpose(-1, -2)
        cos.diagonal(dim1=-1, dim2=-2).fill_(-torch.inf)
        cos[:prompt_len, :prompt_len].fill_(-torch.inf)
        I = torch.topk(cos, PATCHES)[1][:prompt_len, :]  # noqa: E741
        X = mid_outputs[2 * block - 1].mean(0)
        for k in ks:
            if block == 0:
                oracle_cand = torch.stack([X[idxs + 1 - prompt_len].mean(dim=0) for idxs in I[:, :k]])
            else:
                oracle_cand = torch.stack([X[idxs + 1].mean(dim=0) for idxs in I[:, :k]])
            ret[k].append(oracle_cand)
    return {k: torch.stack(v) for k, v in ret.items()}


# -- transcription: load_orth.py / load_orth_deep.py ---------------------------------------------------
def new_forward(self, x, **kwargs):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x_attn = (attn @ v).transpose(1, 2).reshape(B, N, C)

    # Save intermediate output
    x_attn = self.dummy(x_attn)

    x = self.proj(x_attn)
    x = self.proj_drop(x)
    return x


def load_orth_blocks(vit, inputs, blocks, prompt_len=M):
    """load_orth.py (blocks=[0]) and load_orth_deep.py (blocks=range(block_num)): one (prompt_len, D) per block."""
    model = FullModel(copy.deepcopy(vit))
    model.eval()
    for i in blocks:
        model.enc.blocks[i].attn.dummy = nn.Identity()
        model.enc.blocks[i].attn.forward = new_forward.__get__(model.enc.blocks[i].attn)
    W_V_dict, V_b_dict = {}, {}
    for n, p in model.named_parameters():
        for i in blocks:
            if 'qkv.weight' in n and f'enc.blocks.{i}.' in n:
                d = p.size(1)
                W_V_dict[i] = p[-d:, :].data
            if 'qkv.bias' in n and f'enc.blocks.{i}.' in n:
                d = p.size(0) // 3
                V_b_dict[i] = p[-d:].data
    return_layers = {f'enc.blocks.{i}.attn.dummy': i for i in blocks}
    melo = MidGetter(model, return_layers=return_layers, keep_output=False)
    torch.manual_seed(0)
    ret = []
    with torch.no_grad():
        mid_outputs, _ = melo(inputs)
    for block in blocks:
        orthogonal_vectors = []
        O = mid_outputs[block].mean(0)
        n, d = O.shape
        Q, _ = torch.linalg.qr(O.T, mode='reduced')
        P = torch.eye(d) - Q @ Q.T
        W_V, V_b = W_V_dict[block], V_b_dict[block]
        for _ in range(prompt_len):
            val = math.sqrt(6. / float(3 * PATCH**2 + d))
            rand_vec = torch.randn(d).uniform_(-val, val)
            rand_vec = rand_vec @ W_V.T + V_b
            orth_vec = P @ rand_vec
            orth_vec = (orth_vec - V_b) @ torch.linalg.pinv(W_V)
            orthogonal_vectors.append(orth_vec)
        ret.append(torch.stack(orthogonal_vectors))
    return torch.stack(ret)


# -- transcription: vit_mae.py, INITIATION == "vipamin" ------------------------------------------------
def combine(vip, anti, lamb, deep):
    if deep:
        return ((1 - lamb) * vip[0] + lamb * anti[0]).unsqueeze(0), (1 - lamb) * vip[1:] + lamb * anti[1:]
    return (1 - lamb) * vip + lamb * anti, None


# -- the official pipeline on gapt's tiny model ---------------------------------------------------------
def first_batch(data, batch=256):
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:min(batch, len(data))]
    return data.tensors[0][idx]


def official(model, data, ks, deep, batch=256):
    """{k: match}, orth of the scripts on ``model``'s frozen backbone (shallow: (1, M, D); deep: (L, M, D))."""
    inputs = first_batch(data, batch)
    torch.manual_seed(0)
    vpt = PromptedVisionTransformer(copy.deepcopy(model.backbone), M, deep).eval()
    match = (load_match_deep if deep else load_match)(vpt, inputs, ks)
    orth = load_orth_blocks(model.backbone, inputs, list(range(model.depth)) if deep else [0])
    return match, orth  # shallow: the stack of one block, i.e. load_orth.py's unsqueeze(0)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % 5)


def vip_model(backbone="test_mae_tiny", **kw):
    """A tiny model whose attention is sharpened (q, k rows x 16), as pretrained attention is peaked: with the
    random init's near-uniform attention, the batch-mean attention outputs O of different tokens are almost
    equal, qr(O^T) is ill-conditioned (smallest / largest singular value ~1e-5) and float32 rounding alone
    moves the orthogonal part by ~1e-3 of its size, in the scripts' own runs as in any other."""
    model = tiny_model(backbone, **kw)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            qkv = getattr(blk.attn.qkv, "base_layer", blk.attn.qkv)  # the frozen Linear (inside a LoRA part)
            qkv.weight[:2 * qkv.in_features] *= 16
    return model


def close(a, b, scale=0.0, lam=0.0):
    """Equal to float rounding: 1e-5 of the largest value; 2e-4 with the orthogonal part (lam > 0), which goes
    through qr and pinv of float32 statistics (see vip_model)."""
    a, b = a.detach().float(), b.detach().float()
    rel = 2e-4 if lam > 0 else 1e-5
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(scale, float(b.abs().max())))


# -- equal to the official scripts --------------------------------------------------------------------
def test_shallow_match_orth_and_combination(data):
    model = vip_model(method="vpt-shallow", num_prompts=M)
    match, orth = official(model, data, ks=[1, 2, 8, 16], deep=False)
    for k in (1, 2, 8, 16):
        for lam in (0.0, 0.5, 1.0):
            record = init_prompts_vipamin(model, data, k=k, lam=lam)
            expected, _ = combine(match[k], orth, lam, deep=False)
            close(model.prompt_embeddings, expected, float(orth.abs().max()), lam)
    assert record["image_indices"] == torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
def test_deep_match_orth_and_combination(backbone, data):
    model = vip_model(backbone, method="vpt-deep", num_prompts=M)
    match, orth = official(model, data, ks=[2, 8], deep=True)
    for k, lam in ((2, 0.0), (8, 0.0), (8, 1.0), (2, 0.5)):
        init_prompts_vipamin(model, data, k=k, lam=lam, batch_size=7)  # summed over chunks of 7
        shallow, deep = combine(match[k], orth, lam, deep=True)
        close(model.prompt_embeddings, shallow, float(orth.abs().max()), lam)
        close(model.deep_prompt_embeddings, deep, float(orth.abs().max()), lam)


def test_first_batch_is_at_most_the_batch(data):
    model = vip_model(method="vpt-shallow", num_prompts=M)
    match, orth = official(model, data, ks=[8], deep=False, batch=12)
    record = init_prompts_vipamin(model, data, k=8, lam=0.5, batch=12)
    close(model.prompt_embeddings, combine(match[8], orth, 0.5, deep=False)[0], float(orth.abs().max()), 0.5)
    assert record["images"] == 12


@pytest.mark.parametrize("method", ["gated", "gated+temperature"])
def test_gates_and_temperatures_compose(method, data):
    model = vip_model(method="gated", num_prompts=M, learn_temperature=method.endswith("temperature"))
    match, orth = official(model, data, ks=[8], deep=False)
    init_prompts_vipamin(model, data, k=8, lam=0.5)
    close(model.prompt_embeddings, combine(match[8], orth, 0.5, deep=False)[0], float(orth.abs().max()), 0.5)


def test_lora_composition_reads_the_step0_value_weights(data):
    from gapt.model.parts import strip
    model = vip_model(method="vpt-deep+lora", num_prompts=M)
    with torch.no_grad():  # a LoRA already away from zero: W_V is the folded weight W + (alpha / r) B A
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    init_prompts_vipamin(model, data, k=8, lam=1.0)
    folded = copy.deepcopy(model)
    for blk in folded.backbone.blocks:  # the transcription reads qkv.weight: give it the folded layer
        wrapper = blk.attn.qkv
        lin = strip(copy.deepcopy(wrapper))  # a plain Linear
        probe = torch.cat([torch.zeros(1, lin.in_features), torch.eye(lin.in_features)])
        with torch.no_grad():
            out = wrapper(probe)
            lin.weight.copy_((out[1:] - out[0]).T)
            lin.bias.copy_(out[0])
        blk.attn.qkv = lin
    _, orth = official(folded, data, ks=[8], deep=True)
    close(model.deep_prompt_embeddings, orth[1:], float(orth.abs().max()), 1.0)


# -- where gapt goes beyond the scripts: vpt-at-block k ------------------------------------------------
def test_at_block_uses_block_k(data):
    model = vip_model(method="vpt-at-block", insert_at_block=3, num_prompts=M)
    init_prompts_vipamin(model, data, k=1, lam=0.0)  # k = 1: each prompt IS one batch-mean patch row
    inputs = first_batch(data)
    with torch.no_grad():
        x = model.backbone._pos_embed(model.backbone.patch_embed(inputs))  # pos_drop's output
        for blk in model.backbone.blocks[:2]:
            x = blk(x)
    rows = x.mean(0)[1:]  # (16, D): block 3's input, batch mean, patches
    for p in model.prompt_embeddings[0].detach():
        assert torch.cdist(p[None], rows).min() < 1e-5
    init_prompts_vipamin(model, data, k=1, lam=1.0)  # the orthogonal part: load_orth.py at block index 2
    close(model.prompt_embeddings[0], load_orth_blocks(model.backbone, inputs, [2])[0], lam=1.0)


# -- records, randomness and errors -------------------------------------------------------------------
def test_record_and_global_rng(data):
    model = vip_model(method="vpt-deep", num_prompts=M)
    state = torch.get_rng_state()
    record = init_prompts_vipamin(model, data, k=2, lam=0.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert (record["seed"], record["k"], record["lambda"], record["images"]) == (0, 2, 0.5, 20)
    assert sorted(record["blocks"], key=int) == ["1", "2", "3", "4"]
    assert all(len(b["matched_patches"]) == M and all(0 <= j < PATCHES for row in b["matched_patches"] for j in row)
               for b in record["blocks"].values())


def test_errors(data):
    with pytest.raises(ValueError, match="vipamin_k=17"):
        init_prompts_vipamin(vip_model(method="vpt-shallow", num_prompts=M), data, k=17)
    with pytest.raises(ValueError, match="linear"):
        init_prompts_vipamin(vip_model(method="linear"), data)
