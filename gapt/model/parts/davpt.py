"""DA-VPT (Ren et al., CVPR 2025; SPEC §12.5): fresh prompts at every block, guided by a metric loss.

Follows Noahsark/DA-VPT @ 1a5ac60: ``models/vpt.py::PromptVisionTransformer.forward_features``,
``models/attn.py::VPTAttention`` and ``models/criterion.py::VPTCriterion`` (``fast_selection``,
``ml_patch_forward``, ``ml_cls_forward``). Block l (0-based) runs on

    [x_cls (+ registers), dropout(vpt_norm(P_l)), x_img]          x_img = the patch tokens of block l-1's output

so every block gets fresh prompts and the previous block's prompt outputs are dropped. ``P_l`` is a
row of ``proxy_prompt_tokens`` (p_depth, p_len, D) at the proxy blocks ``davpt_proxy_first..last``
(default: the last block only) and of ``other_prompt_tokens`` (o_depth, num_prompts, D) elsewhere
(``num_prompts`` may be 0). ``p_len = davpt_proxy_len``, or ``num_classes`` when there are fewer classes
(the authors' ``train.py`` then maps class c to proxy c and never re-clusters). Both tensors start as
``xavier_uniform_`` of a (depth, len, D) tensor (bound sqrt(6 / (len D + depth D))), divided by 8 when
``davpt_init_div8``. ``vpt_norm``: none | l2 (``F.normalize``, eps 1e-6) | layer (a trained LayerNorm,
``vpt_norm.*``). Names as the authors': their checkpoints' prompt tensors load as they are
(:func:`gapt.model.parts.davpt_bias.load_authors_state`).

Metric loss (training only, it needs the labels: ``Step.targets``): at each proxy block, with the
block's INPUT tokens x (prompts inserted, dropout applied) and P = vpt_norm(P_l) before dropout,

    L_l = davpt_patch_weight * PA(mean of x's patch tokens, P) + davpt_cls_weight * PA(q_cls, P)

with PA :func:`proxy_anchor_loss` (tau = ``davpt_scale``) and q_cls = W_q norm1(x_cls) + b_q (the
attention's query of the CLS token, ``cls_type='query'``; ``key`` and ``cls`` (x_cls itself) selectable).
The mean over the proxy blocks is added to the cross-entropy (``Step.losses``). Labels map to proxies
through ``model.davpt_mapping`` (class -> proxy), set by the init pass (:mod:`gapt.engine.davpt_init`:
cosine k-means of class-mean features) and, with ``davpt_dynamic_kmeans = e``, re-clustered at the end of
every epoch from the 0-based epoch e on (the authors' ``dynamic_kmeans``), from the trained model's pooled
features of that epoch and the previous centroids; until the init pass runs it is the authors' balanced
``c mod p_len``. The code's ``patch_type`` is ignored by the code itself (it always uses the patch
mean of the block input), and so here.

Options of the released configs: ``davpt_mask`` (prompt rows attend to the patch columns only:
``VPTAttention._generate_mask``), ``davpt_drop_path`` (stochastic depth linspace(0, rate) over the
frozen blocks, active in training as the authors' train-mode blocks; gapt's backbone otherwise never
runs in training mode). Not carried over: ``forward_vpt`` returning 0 silently on any exception.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import BlockCall, Part, Step
from .davpt_loss import cosine_kmeans, proxy_anchor_loss

PROMPT_NORMS = ("none", "l2", "layer")
CLS_TYPES = ("query", "key", "cls")


def xavier_prompts(depth: int, length: int, dim: int, div8: bool) -> torch.Tensor:
    """``nn.init.xavier_uniform_(torch.randn(depth, length, dim)) / (8 if div8 else 1)``, as the authors
    draw it (the randn values are overwritten; only the draw order of the global RNG matters)."""
    t = torch.randn(depth, length, dim)
    if t.numel():
        nn.init.xavier_uniform_(t)
    return t / (8.0 if div8 else 1.0)


def project(attn: nn.Module, h: torch.Tensor, which: int) -> torch.Tensor:
    """The query (``which=0``) or key (1) projection of tokens ``h`` (B, N, D) by a timm Attention (fused
    ``qkv``, possibly wrapped by parts) or an EvaAttention (separate, or fused with q/v biases)."""
    if getattr(attn, "qkv", None) is None:
        return (attn.q_proj, attn.k_proj)[which](h)
    if getattr(attn, "q_bias", None) is not None:
        out = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        out = attn.qkv(h)
    d = out.shape[-1] // 3
    return out[..., which * d:(which + 1) * d]


class DAVPT(Part):
    name = "da-vpt"
    kind = "prompts"

    def __init__(self, settings, component: str = "da-vpt"):
        super().__init__(settings)
        s = settings
        self.num_other = int(s.num_prompts)
        self.proxy_len_setting = int(s.davpt_proxy_len)
        self.prompt_norm = s.davpt_prompt_norm
        self.patch_weight, self.cls_weight = float(s.davpt_patch_weight), float(s.davpt_cls_weight)
        self.cls_type, self.scale = s.davpt_cls_type, float(s.davpt_scale)
        self.mask, self.drop_path = bool(s.davpt_mask), float(s.davpt_drop_path)
        self.dynamic = int(s.davpt_dynamic_kmeans)
        if self.num_other < 0:
            raise ValueError(f"da-vpt needs num_prompts >= 0 (the other blocks' prompts), got {self.num_other}")
        if self.prompt_norm not in PROMPT_NORMS or self.cls_type not in CLS_TYPES:
            raise ValueError(f"da-vpt: davpt_prompt_norm in {list(PROMPT_NORMS)}, davpt_cls_type in {list(CLS_TYPES)}")
        self.hooks = ("begin", "tokens") + (("block",) if self.mask else ()) + (("mix",) if self.dynamic > 0 else ())
        self.centroids: Optional[torch.Tensor] = None
        self.generator = torch.Generator().manual_seed(0)  # k-means draws; seeded by the init pass
        self.reclustered = 0
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        self._accumulating = False

    # -- build -----------------------------------------------------------------------------------
    def attach(self, model) -> None:
        depth, dim, s = model.depth, model.embed_dim, self.settings
        last = int(s.davpt_proxy_last) or depth
        first = int(s.davpt_proxy_first) or last
        if not 1 <= first <= last <= depth:
            raise ValueError(f"da-vpt: proxy blocks {first}..{last} must lie in 1..{depth} "
                             f"(davpt_proxy_first, davpt_proxy_last; 0 = the last block)")
        self.proxy_blocks = list(range(first - 1, last))
        self.other_blocks = [i for i in range(depth) if i not in self.proxy_blocks]
        self.index = {i: ("proxy_prompt_tokens", r) for r, i in enumerate(self.proxy_blocks)}
        self.index.update({i: ("other_prompt_tokens", r) for r, i in enumerate(self.other_blocks)})
        classes = int(model.num_classes)
        self.all_classes = classes < self.proxy_len_setting  # train.py: proxy_prompt_len = num_classes
        self.proxy_len = classes if self.all_classes else self.proxy_len_setting
        model.proxy_prompt_tokens = nn.Parameter(
            xavier_prompts(len(self.proxy_blocks), self.proxy_len, dim, s.davpt_init_div8))
        model.other_prompt_tokens = nn.Parameter(
            xavier_prompts(len(self.other_blocks), self.num_other, dim, s.davpt_init_div8))
        model.vpt_norm = nn.LayerNorm(dim, eps=1e-6) if self.prompt_norm == "layer" else None
        model.register_buffer("davpt_mapping", torch.arange(classes) % self.proxy_len, persistent=False)
        model.num_prompts = self.length(depth - 1)  # the prompts in the final tokens (pooling, prefix count)
        if self.drop_path > 0:
            from timm.layers import DropPath
            for i, blk in enumerate(model.backbone.blocks):
                rate = float(torch.linspace(0, self.drop_path, depth)[i])
                blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
                blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()

    def length(self, i: int) -> int:
        """Prompts at block ``i`` (0-based)."""
        return self.proxy_len if i in self.proxy_blocks else self.num_other

    def frozen_blocks(self, model) -> int:
        if self.drop_path > 0:
            return 0  # stochastic blocks cannot be cached
        return next((i for i in range(model.depth) if self.length(i) > 0), model.depth - 1)

    def owns(self, name: str) -> bool:
        return name in ("proxy_prompt_tokens", "other_prompt_tokens") or name.startswith("vpt_norm.")

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1  # utils.param_groups_weight_decay: vpt_norm's LayerNorm; prompts decay

    def train_modules(self, model) -> List[nn.Module]:
        if self.drop_path <= 0:
            return []
        return [m for blk in model.backbone.blocks for m in (blk.drop_path1, blk.drop_path2)]

    def not_mergeable(self) -> str:
        return "da-vpt: prompts are extra tokens in the sequence, not a change of the weights"

    def insertions(self, model) -> list:
        return []  # its prompts come from its own init, not from prompt_init=prototype (refused by the settings)

    # -- forward -----------------------------------------------------------------------------------
    def prompts(self, model, i: int) -> torch.Tensor:
        """vpt_norm(P_i): block ``i``'s prompts (len, D) before dropout."""
        name, row = self.index[i]
        p = getattr(model, name)[row]
        if self.prompt_norm == "l2":
            return F.normalize(p, p=2, dim=-1, eps=1e-6)
        if self.prompt_norm == "layer":
            return model.vpt_norm(p)
        return p

    def begin(self, model, step: Step) -> None:
        step.davpt_inside = 0   # prompts in the tokens now: none when a pass (or a cached prefix) starts
        step.davpt_tokens = 0

    def tokens(self, model, i: int, x: torch.Tensor, step: Step) -> torch.Tensor:
        prefix, inside = step.prefix, step.davpt_inside
        p = self.prompts(model, i)
        dropped = model.prompt_dropout(p[None].expand(x.shape[0], -1, -1))
        x = torch.cat([x[:, :prefix], dropped, x[:, prefix + inside:]], dim=1)
        step.davpt_inside, step.davpt_tokens = p.shape[0], x.shape[1]
        if i in self.proxy_blocks and model.training and step.targets is not None and p.shape[0] > 0:
            loss = self.block_loss(model, i, x, p, step)
            if loss is not None:
                step.losses.append(loss / len(self.proxy_blocks))  # the mean over the proxy blocks
        return x

    def block_loss(self, model, i: int, x: torch.Tensor, p: torch.Tensor, step: Step) -> Optional[torch.Tensor]:
        """L_l of the module doc for block ``i`` with input tokens ``x`` and prompts ``p``."""
        assigned = model.davpt_mapping[step.targets.to(model.davpt_mapping.device)].to(x.device)
        loss = None
        if self.patch_weight:
            patches = x[:, step.prefix + p.shape[0]:].mean(dim=1)
            loss = self.patch_weight * proxy_anchor_loss(patches, p, assigned, self.scale)
        if self.cls_weight:
            blk, cls = model.backbone.blocks[i], x[:, :1]
            feature = cls if self.cls_type == "cls" else project(blk.attn, blk.norm1(cls), CLS_TYPES.index(self.cls_type))
            term = self.cls_weight * proxy_anchor_loss(feature[:, 0], p, assigned, self.scale)
            loss = term if loss is None else loss + term
        return loss

    def block(self, model, i: int, call: BlockCall, step: Step) -> None:
        n, prefix, inside = step.davpt_tokens, step.prefix, step.davpt_inside
        if inside:  # VPTAttention._generate_mask: prompt rows see no CLS / prompt column
            allowed = torch.ones(n, n, dtype=torch.bool, device=model.proxy_prompt_tokens.device)
            allowed[prefix:prefix + inside, :prefix + inside] = False
            call.attn_mask = allowed

    def mix(self, model, i: int, out: torch.Tensor, x_in: torch.Tensor, step: Step) -> torch.Tensor:
        if i == model.depth - 1 and self._accumulating and model.training and step.targets is not None:
            with torch.no_grad():  # the trained model's pooled features of this epoch, per class
                feats = model.pool(out).float()
                y = step.targets.to(feats.device)
                self._sums.index_add_(0, y, feats.to(self._sums.device))
                self._counts.index_add_(0, y.to(self._counts.device), torch.ones_like(y, dtype=torch.float,
                                                                                      device=self._counts.device))
        return out

    # -- the class -> proxy mapping ------------------------------------------------------------------
    def set_mapping(self, model, mapping: torch.Tensor, centroids: Optional[torch.Tensor]) -> bool:
        """``PromptVisionTransformer.update_mapping``: take it if it uses more than one proxy, else keep the
        old mapping and forget the centroids (the next clustering starts afresh). Returns whether taken."""
        if len(torch.unique(mapping)) > 1:
            model.davpt_mapping.copy_(mapping.to(model.davpt_mapping.device))
            self.centroids = None if centroids is None else centroids.detach().float().cpu()
            return True
        self.centroids = None
        return False

    def recluster_enabled(self) -> bool:
        return not self.all_classes and self.proxy_len > 0

    def epoch_begin(self, model, epoch: int) -> None:
        self._accumulating = self.dynamic > 0 and epoch >= self.dynamic and self.recluster_enabled()
        if self._accumulating:
            device = model.proxy_prompt_tokens.device
            self._sums = torch.zeros(model.num_classes, model.embed_dim, device=device)
            self._counts = torch.zeros(model.num_classes, device=device)

    def epoch_end(self, model, epoch: int) -> None:
        if not self._accumulating:
            return
        sums, counts = self._sums, self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.zeros_like(sums))
        centroids, mapping = cosine_kmeans(means.cpu(), self.proxy_len, self.centroids, self.generator)
        self.set_mapping(model, mapping, centroids)
        self.reclustered += 1
        self._accumulating, self._sums, self._counts = False, None, None

    def state(self, model) -> Dict:
        """What a resumed run needs besides the trained tensors (the mapping moves during training)."""
        return {"mapping": model.davpt_mapping.detach().cpu().clone(), "centroids": self.centroids,
                "generator": self.generator.get_state(), "reclustered": self.reclustered}

    def load_state(self, model, state: Dict) -> None:
        model.davpt_mapping.copy_(state["mapping"].to(model.davpt_mapping.device))
        self.centroids = state.get("centroids")
        self.generator.set_state(state["generator"])
        self.reclustered = int(state.get("reclustered", 0))
