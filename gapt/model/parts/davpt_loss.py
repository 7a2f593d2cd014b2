"""DA-VPT's metric loss and its class-to-proxy clustering (SPEC §12.5), pure torch.

``proxy_anchor_loss`` is Noahsark/DA-VPT ``models/criterion.py::VPTCriterion.ml_patch_forward`` /
``ml_cls_forward`` with ``masked_logsumexp`` (``criterion="proxyanchor"``, ``proxy_dim=0``): with
s_ij = cos(f_i, p_j) * tau and m(i) the proxy of sample i's class,

    L = mean_j log(1 + sum_{i: m(i)=j} exp(-alpha (s_ij - delta)))
      + mean_j log(1 + sum_{i: m(i)!=j} exp( alpha (s_ij + delta)))          alpha = 32, delta = 0.1

A proxy without positives (or negatives) in the batch adds log(1) = 0 but still counts in the mean (a
plain mean over all proxies; the original Proxy Anchor divides the positive term by the proxies
that have positives). The code scales the normalised proxies by tau and leaves the features
normalised: the same s_ij.

``cosine_kmeans`` is ``model_creator.py::cosine_kmeans`` (``kmeans_norm="layer"``, 20 iterations,
tol 1e-4): all-zero rows (classes without features) are left out and assigned a random proxy; the
others are LayerNorm-ed (no affine), centroids start at ``k`` random rows (or the given ones),
assignment by the highest cosine similarity, a centroid without rows keeps its place, stop once
the centroids move less than ``tol`` in summed L2 norm. Its random draws come from ``generator``
(the authors' draw from torch's global RNG in the same order: ``randperm`` then ``randint``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ALPHA = 32.0          # loss_oproxy_pos_alpha = loss_oproxy_neg_alpha (params.py defaults; no config changes them)
DELTA = 0.1           # loss_oproxy_pos_delta = 0.1, loss_oproxy_neg_delta = -0.1
KMEANS_ITERS = 20     # cosine_kmeans(max_iter=20)
KMEANS_TOL = 1e-4
KMEANS_NORMS = ("none", "l2", "layer")


def _log1p_sum_exp(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_i exp(w_ij)) over the rows i where ``mask`` holds, per column j (0 for an empty column)."""
    w = w.masked_fill(~mask, float("-inf"))
    w = torch.cat([w, w.new_zeros(1, w.shape[1])], dim=0)  # exp(0) = 1: the "1 +"
    return torch.logsumexp(w, dim=0)


def proxy_anchor_loss(features: torch.Tensor, proxies: torch.Tensor, assigned: torch.Tensor, scale: float,
                      alpha: float = ALPHA, delta: float = DELTA) -> torch.Tensor:
    """DA-VPT's Proxy-Anchor-style loss (module doc), in float32.

    ``features`` (B, D), ``proxies`` (P, D), ``assigned`` (B,) each sample's proxy index."""
    f = F.normalize(features.float(), dim=-1)
    p = F.normalize(proxies.float(), dim=-1) * float(scale)
    sims = f @ p.T                                                        # (B, P)
    positive = assigned.view(-1, 1) == torch.arange(p.shape[0], device=sims.device).view(1, -1)
    pos = _log1p_sum_exp(-alpha * (sims - delta), positive)
    neg = _log1p_sum_exp(alpha * (sims + delta), ~positive)
    return pos.mean() + neg.mean()


def _normed(x: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l2":
        return F.normalize(x, p=2, dim=1)
    if norm == "layer":
        return F.layer_norm(x, x.shape[1:])  # no affine, as the authors' ("no trainable weight/bias applied")
    return x


@torch.no_grad()
def cosine_kmeans(data: torch.Tensor, k: int, centroids: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL,
                  norm: str = "layer") -> Tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k, D), assignment (C,)) of the class features ``data`` (C, D); see the module doc."""
    if norm not in KMEANS_NORMS:
        raise ValueError(f"unknown k-means norm {norm!r}; valid: {list(KMEANS_NORMS)}")
    data = data.float()
    zero = (data == 0).all(dim=1)
    x = _normed(data[~zero], norm)
    if centroids is None:
        if x.shape[0] < k:
            raise ValueError(f"DA-VPT's k-means needs at least k={k} classes with features, got {x.shape[0]}")
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)]
    centroids = centroids.to(x.device, x.dtype)
    assignment = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(int(iters)):
        assignment = F.cosine_similarity(x[:, None], centroids[None, :], dim=2).argmax(dim=1)
        new = torch.stack([x[assignment == j].mean(dim=0) if bool((assignment == j).any()) else centroids[j]
                           for j in range(k)])
        if torch.norm(centroids - new, dim=1).sum() < tol:
            break
        centroids = new
    combined = torch.empty(data.shape[0], dtype=torch.long, device=data.device)
    combined[~zero] = assignment
    combined[zero] = torch.randint(k, (int(zero.sum()),), generator=generator).to(data.device)
    return centroids, combined


def smart_sample(count: int, n: int, generator: torch.Generator) -> List[int]:
    """``Dataset/mapping_sampler.py::MappingSampler._smart_sample`` on positions 0..count-1: ``n`` distinct
    ones when there are enough, else every one ``n // count`` times plus ``n % count`` distinct ones."""
    if count < 1:
        return []
    if n <= count:
        return torch.randperm(count, generator=generator)[:n].tolist()
    picks = list(range(count)) * (n // count)
    return picks + torch.randperm(count, generator=generator)[:n % count].tolist()


def class_samples(labels: Sequence[int], num_classes: int, per_class: int, generator: torch.Generator) -> List[int]:
    """Indices of ``per_class`` images of every class (MappingSampler's subset), classes in order."""
    by_class: List[List[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    out: List[int] = []
    for members in by_class:
        out += [members[j] for j in smart_sample(len(members), per_class, generator)]
    return out
