"""``prompt_init=prototype``: prompts initialised from k-means prototypes of the downstream
training set's token features: the variant the Self-Prompt Tuning paper describes (Wang et al.,
ICML 2024). SPT's released code samples single tokens instead, by default (``prompt_init=spt``,
gapt/engine/prompt_init/spt.py); its k-means centres (``kmeans-prompt/0.3/depth_{d}.txt``, about 30 %
of the data) and the code that made them are not released, so this is gapt's k-means of its own
choosing (below), not a transcription (SPEC §12.1(g)1).

Where the features come from (the tokens the prompts will sit beside, before any prompt exists):

  vpt-shallow, gated   patch tokens entering block 1, i.e. ``model.embed(images)`` without CLS/registers
  vpt-at-block k       patch tokens entering block k: the frozen blocks 1..k-1 applied to the embedding
  vpt-deep             ``prompt_embeddings`` from the tokens entering block 1; block l's deep prompts
                       (l = 2..L) from the tokens entering block l, computed by the frozen backbone
                       *without* prompts (the deep prompts of earlier blocks do not exist yet)

The backbone runs without temperatures (tau starts at 1, so this is the same thing at init).

Determinism: one ``torch.Generator`` seeded with ``seed`` draws, in this order, (1) the image
sample ``randperm(len(dataset))[:num_images]`` and (2) the k-means++ seeds of every k-means run
(prompt_embeddings first, then the deep prompts of blocks 2..L). Random data augmentation of the
sampled images runs under ``torch.random.fork_rng`` seeded with ``seed``, so it is repeatable too,
and the caller's global RNG stream is left exactly as it was. Same seed, data and device -> the
same prompts (floating-point results can differ between CPU and GPU).

k-means: k-means++ seeding (first centre uniform, each next one drawn with probability
proportional to the squared distance to the nearest chosen centre), then at most ``iters``
Lloyd steps (assign every point to its nearest centre, ties to the lowest index; move each
centre to the mean of its points; a centre left without points stays where it is), stopping
early once the assignment no longer changes. All in float32 torch on the model's device.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Tuple, Union

import torch

log = logging.getLogger("gapt")

__all__ = ["init_prompts_from_prototypes", "prototype_features", "kmeans", "kmeans_plusplus",
           "sample_indices", "squared_distances", "assign", "lloyd"]


# -- k-means ------------------------------------------------------------------------------------
def squared_distances(x: torch.Tensor, centres: torch.Tensor, x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, K) squared Euclidean distances, clamped at 0 (the expanded form can dip below).

    ``x_sq``: the rows' squared norms, when already known."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = x_sq[:, None] - 2.0 * (x @ centres.T) + (centres * centres).sum(1)[None]
    return d.clamp_min_(0.0)


def assign(x: torch.Tensor, centres: torch.Tensor, x_sq: Optional[torch.Tensor] = None,
           chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest centre for every row of ``x`` (ties: the lowest index)."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    return torch.cat([squared_distances(x[i:i + chunk], centres, x_sq[i:i + chunk]).argmin(1)
                      for i in range(0, len(x), chunk)])


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (k, D) centres chosen among the rows of ``x``.

    Draws come from ``generator`` (a CPU generator): the first index by
    ``randint(N)``, every later one by ``multinomial(d2 / sum d2, 1)`` over the float64
    squared distances to the nearest centre chosen so far (uniform ``randint`` again if every
    point already coincides with a centre).
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    x_sq = (x * x).sum(1)

    def sq_dist_to(i: int) -> torch.Tensor:
        d = squared_distances(x, x[i:i + 1], x_sq)[:, 0]
        d[i] = 0.0  # exactly, whatever the rounding of the expanded form
        return d

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = sq_dist_to(first)
    for _ in range(1, k):
        w = d2.double().cpu()
        if float(w.sum()) > 0:
            nxt = int(torch.multinomial(w, 1, generator=generator))
        else:
            nxt = int(torch.randint(n, (1,), generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, sq_dist_to(nxt))
        d2[chosen] = 0.0
    return x[chosen].clone()


def lloyd(x: torch.Tensor, centres: torch.Tensor, iters: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """At most ``iters`` Lloyd steps from ``centres``: (centres, assignment, steps run).

    On early stop (assignment unchanged) the centres are the means of their points and every
    point is assigned to its nearest centre: the k-means fixed point.
    """
    centres = centres.clone()
    k = centres.shape[0]
    x_sq = (x * x).sum(1)
    labels: Optional[torch.Tensor] = None
    steps = 0
    for steps in range(1, iters + 1):
        new = assign(x, centres, x_sq)
        if labels is not None and torch.equal(new, labels):
            steps -= 1  # this step changed nothing
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    if labels is None:  # iters == 0
        labels = assign(x, centres, x_sq)
    return centres, labels, steps


def kmeans(x: torch.Tensor, k: int, iters: int = 50, generator: Optional[torch.Generator] = None,
           seed: int = 0) -> torch.Tensor:
    """k-means++ seeded k-means of the rows of ``x`` (N, D) -> (k, D) centres (see the module doc)."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    x = x.float()
    centres, _, _ = lloyd(x, kmeans_plusplus(x, k, generator), iters)
    return centres


# -- features -----------------------------------------------------------------------------------
def sample_indices(num_items: int, num_images: int, generator: torch.Generator) -> List[int]:
    """``num_images`` distinct indices (all when the set is smaller), ``randperm`` order."""
    if num_items < 1:
        raise ValueError("prototype prompt init needs a non-empty training set")
    return torch.randperm(num_items, generator=generator)[:min(num_images, num_items)].tolist()


def _stack_images(dataset, indices: List[int], seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):  # augmentation draws are seeded; the caller's RNG is untouched
        torch.manual_seed(seed)
        return torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])


def _patch_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens of the prompt-free token sequence ``x`` (CLS / registers dropped)."""
    return x[:, model.backbone.num_prefix_tokens:]


@torch.no_grad()
def _block_inputs(model, images: torch.Tensor, blocks: List[int], device, batch_size: int
                  ) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (block l, patch tokens (B*N, D) entering block l) for the 1-based ``blocks`` in
    increasing order, running the frozen backbone without prompts; one block held at a time."""
    wanted = sorted(set(blocks))
    states = [model.embed(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    current = 1
    from ..model.blocks import block_forward
    from ..model.parts import BlockCall
    rope = model.rope(states[0].shape[1] - model.backbone.num_prefix_tokens) if states else None  # Eva: RoPE
    for block in wanted:
        while current < block:  # advance every batch through block `current`
            blk = model.backbone.blocks[current - 1]
            states = [block_forward(blk, s, BlockCall(rope=rope)) for s in states]
            current += 1
        yield block, torch.cat([_patch_tokens(model, s) for s in states]).flatten(0, 1)


def _target_blocks(model) -> List[Tuple[str, int, int]]:
    """(parameter name, row, 1-based block whose input tokens initialise it): the prompt part's insertions."""
    return model.prompt_insertions()


def prototype_features(model, dataset, seed: int = 42, device: Union[str, torch.device, None] = None,
                       num_images: int = 256, batch_size: int = 64) -> Iterator[Tuple[int, torch.Tensor]]:
    """The features k-means sees: (block, (num_images * N, D) patch tokens entering it), per block the
    model's prompts are initialised at. Draws the image sample from a fresh generator seeded ``seed``."""
    _check_method(model)
    g = torch.Generator().manual_seed(int(seed))
    images = _stack_images(dataset, sample_indices(len(dataset), num_images, g), int(seed))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _block_inputs(model, images, [b for _, _, b in _target_blocks(model)], device, batch_size)


def _check_method(model) -> None:
    from .prompt_init.common import check_prompts
    check_prompts(model, "prototype")


@torch.no_grad()
def init_prompts_from_prototypes(model, dataset, seed: int = 42, device: Union[str, torch.device, None] = None,
                                 num_images: int = 256, iters: int = 50, batch_size: int = 64) -> dict:
    """Copy k-means centres (k = num_prompts) of the training set's patch tokens into the prompts.

    ``dataset`` items are ``(image tensor, label)``. Returns a summary
    ``{"images": n, "blocks": {block: {"points": N, "lloyd_steps": s}}}``; the prompts are changed in place.
    """
    _check_method(model)
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(int(seed))
    indices = sample_indices(len(dataset), num_images, g)
    images = _stack_images(dataset, indices, int(seed))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = _target_blocks(model)
    by_block = {}
    for name, row, block in targets:
        by_block.setdefault(block, []).append((name, row))
    summary = {"images": len(indices), "image_indices": indices, "blocks": {}}
    k = model.num_prompts
    for block, feats in _block_inputs(model, images, list(by_block), device, batch_size):
        if feats.shape[0] < k:
            raise ValueError(f"prototype prompt init: {feats.shape[0]} token features at block {block} are fewer "
                             f"than num_prompts={k}; use more images")
        centres, _, steps = lloyd(feats, kmeans_plusplus(feats, k, g), iters)
        for name, row in by_block[block]:
            param = getattr(model, name)
            param[row].copy_(centres.to(param.device, param.dtype))
        summary["blocks"][block] = {"points": int(feats.shape[0]), "lloyd_steps": steps}
        del feats
    model.train(was_training)
    log.info("prompts initialised from k-means prototypes (k=%d) of %d training images at block(s) %s",
             k, len(indices), ", ".join(str(b) for b in summary["blocks"]))
    return summary
