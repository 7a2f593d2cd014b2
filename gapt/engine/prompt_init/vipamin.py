"""``prompt_init=vipamin``: VIPAMIN's matching + orthogonal prompts (Park & Chung, NeurIPS 2025; SPEC §12.2).

As the official scripts compute them (iamjaekyun/vipamin @ ebce4e4: ``load_match.py``,
``load_match_deep.py``, ``load_orth.py``, ``load_orth_deep.py``; combined in
``src/models/vit_prompt/vit_mae.py::PromptedVisionTransformer.__init__``), on ONE batch of B training
images (the scripts' first batch of 256: here min(256, train size) images), for the prompt set
entering block l (0-based i = l - 1):

  matching   the VPT model with random prompts P0 ~ U(-v, v) runs the batch; at block i's qkv,
             k = K.reshape(B, T, H, dh) averaged over the heads, then over the batch, CLS dropped:
             (M + N, dh). C = cos(k, k), C[diag] = -inf, C[prompts, prompts] = -inf; for prompt p,
             I_p = topk(C[p], k). X = the batch mean of block i's input (block 0: ``pos_drop``'s
             output, i.e. CLS + patches + position, no prompts; deep blocks: block i-1's output of
             the prompted model), and match_p = mean over j in I_p of X[patch j].
  orthogonal in the prompt-free model, O = batch mean of block i's attention output before ``proj``
             (T x D); Q, _ = qr(O^T, 'reduced'); Pi = I - Q Q^T; per prompt r ~ U(-v, v)^D,
             v = r W_V^T + b_V (block i's value rows of qkv), v_perp = Pi v, and literally
             orth = (v_perp - b_V) @ pinv(W_V)   (SPEC §12.2(g)4: not W_V^-1 (v_perp - b_V)).
  prompt     P = (1 - lambda) * match(k) + lambda * orth   (``vipamin_k``, ``vipamin_lambda``).

Shallow (vpt-shallow, gated) fills ``prompt_embeddings`` from block 1; deep (vpt-deep) every block,
``prompt_embeddings`` from block 1 and ``deep_prompt_embeddings[l-2]`` from block l, with the random
deep prompts of the VPT-deep model in the matching pass, as ``load_match_deep.py``; vpt-at-block k
(not in VIPAMIN) uses block k with P0 inserted into its prompt-free input. Temperatures start at 1
and LoRA / adapters as the identity, so every composition sees what the plain model sees.

Randomness (fixed seed 0, as every script calls ``torch.manual_seed(0)``): three CPU generators, each
seeded 0, draw (1) the batch, ``randperm(len(train))[:B]``; (2) P0, ``prompt_embeddings`` shaped
(1, M, D) then ``deep_prompt_embeddings`` (L-1, M, D), as VPT's ``nn.init.uniform_``; (3) the orth
vectors, per prompt set then per prompt ``randn(D).uniform_(-v, v)`` as ``load_orth*.py``. The training
transform's draws are seeded 0 too; the caller's RNG is untouched. v is VPT's bound
sqrt(6 / (3 ph pw + D)) (the scripts write 16 for the patch side: the same for ViT-B/16).

Where gapt differs from the scripts: the scripts' "first batch" comes from two separately shuffled
loaders (match and orth may see different images), gapt takes one batch for both; the scripts run a
single 256-image batch, gapt sums in chunks (float64) before dividing, which moves the means by
rounding only.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Union

import torch
import torch.nn as nn

from ...model.blocks import block_forward
from ...model.parts import BlockCall, prompt_init_bound
from .common import check_prompts, image_chunks, insertion_groups, set_prompts

log = logging.getLogger("gapt")

__all__ = ["init_prompts_vipamin", "vipamin_parts", "VIPAMIN_SEED", "VIPAMIN_BATCH"]

VIPAMIN_SEED = 0     # every official script: torch.manual_seed(0)
VIPAMIN_BATCH = 256  # the scripts' batch: reshape(256, N, 3, 12, 64)


def _value_rows(attn: nn.Module):
    """(W_V (D, D), b_V (D,)) of block attention ``attn``'s fused qkv, with any weight part folded in."""
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Module) or getattr(attn, "q_bias", None) is not None:
        raise ValueError("prompt_init=vipamin reads the value rows of a fused attention qkv (timm VisionTransformer); "
                         "this backbone's attention has none")
    if type(qkv) is nn.Linear:  # the frozen layer itself, as the scripts read qkv.weight[-D:], qkv.bias[-D:]
        weight = qkv.weight.detach()
        bias = qkv.bias.detach() if qkv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    else:  # a weight part around it (LoRA, SSF): the affine map it computes, probed at 0 and the unit vectors
        inner = qkv
        while not isinstance(inner, nn.Linear) and hasattr(inner, "base_layer"):  # peft's layout (parts/base.py)
            inner = inner.base_layer
        probe = torch.cat([torch.zeros(1, inner.in_features), torch.eye(inner.in_features)]).to(inner.weight.device)
        out = qkv(probe).detach()
        bias, weight = out[0], (out[1:] - out[0]).T
    d = weight.shape[0] // 3
    return weight[2 * d:].double(), bias[2 * d:].double()


def _with_prompts(x: torch.Tensor, prompts: torch.Tensor, pre: int, replace: bool) -> torch.Tensor:
    """[prefix, prompts, patches]: prompts inserted after the prefix, or replacing the slice that holds them."""
    p = prompts.to(x.dtype)[None].expand(x.shape[0], -1, -1)
    rest = x[:, pre + prompts.shape[0]:] if replace else x[:, pre:]
    return torch.cat([x[:, :pre], p, rest], dim=1)


class _Sums:
    """Batch sums (float64) of one prompt set's statistics: head-mean keys, block input, attention output."""

    def __init__(self):
        self.keys = self.inputs = self.attn_out = None

    def add(self, keys: torch.Tensor, inputs: torch.Tensor, attn_out: torch.Tensor) -> None:
        new = [t.double().sum(0) for t in (keys, inputs, attn_out)]
        if self.keys is None:
            self.keys, self.inputs, self.attn_out = new
        else:
            self.keys += new[0]
            self.inputs += new[1]
            self.attn_out += new[2]


def _batch_statistics(model, dataset, indices: List[int], p0: Dict[str, torch.Tensor], device,
                      batch_size: int) -> Dict[int, _Sums]:
    """Per 1-based insertion block: the sums the matching and orthogonal parts average (module doc)."""
    vit, pre = model.backbone, model.backbone.num_prefix_tokens
    groups = insertion_groups(model)
    first = {block: targets[0] for block, targets in groups}
    last = max(first)
    deep = getattr(model, "deep_prompt_embeddings", None) is not None
    sums = {block: _Sums() for block in first}
    captured: List[torch.Tensor] = []
    for _, images in image_chunks(dataset, indices, VIPAMIN_SEED, batch_size):
        x = model.embed(images.to(device)).float()
        rope = model.rope(x.shape[1] - pre)
        prompted = None
        for i in range(last):
            blk, block = vit.blocks[i], i + 1
            if block in first:
                name, row = first[block]
                p = p0[name][row].to(x.device)
                prompted = _with_prompts(prompted if prompted is not None and deep else x, p, pre,
                                         replace=prompted is not None and deep)
                out = blk.attn.qkv(blk.norm1(prompted))
                d3 = out.shape[-1]
                keys = out[..., d3 // 3:2 * d3 // 3].reshape(*out.shape[:2], blk.attn.num_heads, -1).mean(2)
                handle = blk.attn.proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
                try:
                    x_next = block_forward(blk, x, BlockCall(rope=rope))
                finally:
                    handle.remove()
                sums[block].add(keys, prompted, captured.pop())
                x = x_next
            else:
                x = block_forward(blk, x, BlockCall(rope=rope))
            if prompted is not None and deep and block < last:  # the prompted VPT-deep model runs on
                prompted = block_forward(blk, prompted, BlockCall(rope=rope))
    return sums


def vipamin_parts(model, sums: _Sums, batch: int, block: int, k: int, num_prompts: int, orth_draws: torch.Tensor):
    """(match (M, D), orth (M, D), matched patch indices (M, k)) for one prompt set (module doc)."""
    m, pre = num_prompts, model.backbone.num_prefix_tokens
    keys = (sums.keys / batch).float()[pre:]                 # (M + N, dh): CLS (and registers) dropped
    n_patches = keys.shape[0] - m
    if k > n_patches:
        raise ValueError(f"vipamin_k={k} is more than the {n_patches} patch tokens a prompt can match")
    unit = nn.functional.normalize(keys, p=2, dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    cos.diagonal(dim1=-1, dim2=-2).fill_(-torch.inf)
    cos[:m, :m].fill_(-torch.inf)
    top = torch.topk(cos[:m], k, dim=-1).indices            # (M, k) in the (prompts + patches) numbering
    inputs = (sums.inputs / batch).float()                  # (prefix + M + N, D): block i's prompted input
    match = inputs[top + pre].mean(dim=1)                   # row j + prefix is patch j - M
    attn_out = (sums.attn_out / batch).double()              # (T, D), the prompt-free model
    q, _ = torch.linalg.qr(attn_out.T, mode="reduced")
    proj = torch.eye(q.shape[0], dtype=q.dtype, device=q.device) - q @ q.T
    w_v, b_v = _value_rows(model.backbone.blocks[block - 1].attn)
    w_v, b_v = w_v.to(q.device), b_v.to(q.device)
    values = orth_draws.double().to(q.device) @ w_v.T + b_v
    orth = ((values @ proj.T) - b_v) @ torch.linalg.pinv(w_v)
    return match, orth.float(), top - m


@torch.no_grad()
def init_prompts_vipamin(model, dataset, k: int = 32, lam: float = 0.5, device: Union[str, torch.device, None] = None,
                         batch: int = VIPAMIN_BATCH, batch_size: int = 64) -> Dict:
    """Set the prompts of ``model`` to (1 - lam) * match(k) + lam * orth (module doc); returns the record.

    ``dataset`` items are ``(image tensor, label)``; ``batch`` images (at most the dataset's size) are the
    one batch the statistics come from, pushed ``batch_size`` at a time."""
    check_prompts(model, "vipamin")
    _value_rows(model.backbone.blocks[0].attn)  # a backbone without a fused qkv is refused before any work
    n = len(dataset)
    if n < 1:
        raise ValueError("prompt_init=vipamin needs a non-empty training set")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    m, dim, k, lam = model.num_prompts, model.embed_dim, int(k), float(lam)
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(VIPAMIN_SEED))[:min(batch, n)].tolist()
    bound = prompt_init_bound(model.backbone.patch_embed.patch_size, dim)
    g_p0 = torch.Generator().manual_seed(VIPAMIN_SEED)
    names = [name for name in ("prompt_embeddings", "deep_prompt_embeddings") if getattr(model, name) is not None]
    p0 = {name: torch.zeros(getattr(model, name).shape).uniform_(-bound, bound, generator=g_p0) for name in names}
    was_training = model.training
    model.eval()
    sums = _batch_statistics(model, dataset, indices, p0, device, batch_size)
    g_orth = torch.Generator().manual_seed(VIPAMIN_SEED)
    record: Dict = {"images": len(indices), "image_indices": indices, "seed": VIPAMIN_SEED, "k": k, "lambda": lam,
                    "blocks": {}}
    for block, targets in insertion_groups(model):
        draws = torch.stack([torch.randn(dim, generator=g_orth).uniform_(-bound, bound, generator=g_orth)
                             for _ in range(m)])
        match, orth, matched = vipamin_parts(model, sums[block], len(indices), block, k, m, draws)
        prompts = (1 - lam) * match + lam * orth.to(match.device)
        for name, row in targets:
            set_prompts(model, name, row, prompts)
        record["blocks"][str(block)] = {
            "tensors": [f"{nm}[{r}]" for nm, r in targets], "matched_patches": matched.tolist(),
            "match_norm": float(match.norm(dim=-1).mean()), "orth_norm": float(orth.norm(dim=-1).mean())}
    model.train(was_training)
    log.info("prompts initialised by VIPAMIN (k=%d, lambda=%g) from %d training images at block(s) %s", k, lam,
             len(indices), ", ".join(record["blocks"]))
    return record
