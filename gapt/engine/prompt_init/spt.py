"""``prompt_init=spt``: Self-Prompt Tuning's released sampler (Wang et al., ICML 2024; SPEC §12.1).

The official code (WangYZ1608/Self-Prompt-Tuning @ ce0754f: ``train_MAE.py::prompt_generator``,
``train_MoCo.py::prompt_generator``, ``utils.py::RepCatcher``, ``prompt_sample_type="random"``, the
README's and both scripts' default) does::

    sample_idx = torch.randint(len(train_data), size=(S,))       # S images, WITH replacement
    shallow:  x_ = patch_embed(imgs).reshape(-1, D)                # no CLS, no position embedding
              prompt = x_[argsort(rand(S*N))[:M]]                  # M single patch tokens
    deep:     rep_0 = patch_embed(imgs); rep_i = blocks[i-1] output without CLS (block i's input in
              the prompt-free model), i = 1..L-1; for i = 0..L-1 in order:
              prompt[i] = rep_i.reshape(-1, D)[argsort(rand(S*N))[:M]]

S: ``train_MoCo.py`` samples ONE image (``sample_size=1``); ``train_MAE.py`` and ``train.py`` (the
supervised ViT) resample the whole training set (``sample_size = len(train_data)``). ``spt_images=0``
follows that per backbone (MoCo v3 checkpoints: 1, every other: the train set's size); any other
value is S. Images go through the training transform (FGVC: random crop and flip) in eval mode.

gapt makes the same RNG calls in the same order (``randint`` for the images, then one ``rand`` per
prompt set, in block order) on a ``torch.Generator`` seeded ``seed`` (the run's ``train.seed``): equal to
the official function run right after ``torch.manual_seed(seed)`` (the scripts themselves seed nothing).
The transform's random draws come from their own stream (seeded ``seed``), so they never shift the
token choice. Where the official code holds every image and every block's tokens at once (S x N x D
per block), gapt streams the images in chunks and keeps only the chosen rows: the same prompts.

gapt's prompt placements: vpt-shallow and gated take the shallow rule, vpt-deep the deep rule, and
vpt-at-block k (not in SPT) the input of block k (k = 1: the raw patch embeddings, as shallow).
``prompt_init=prototype`` (k-means centres, gapt/engine/prototype.py) is the paper's variant.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import torch

from .common import check_prompts, image_chunks, insertion_groups, patch_embedding, prompt_free_inputs, set_prompts

log = logging.getLogger("gapt")

__all__ = ["init_prompts_spt", "default_spt_images"]


def default_spt_images(model, train_size: int) -> int:
    """S of the official script for this backbone: 1 for MoCo v3 (``train_MoCo.py``), else the train set's size."""
    from ...model.backbones import BACKBONES
    spec = BACKBONES.get(getattr(model, "backbone_name", ""))
    return 1 if spec is not None and spec.checkpoint_format == "mocov3" else int(train_size)


def _source(block: int) -> str:
    return "patch_embed (no CLS, no position embedding)" if block == 1 else f"input of block {block} (prompt-free)"


@torch.no_grad()
def init_prompts_spt(model, dataset, seed: int = 42, device: Union[str, torch.device, None] = None,
                     num_images: int = 0, batch_size: int = 64) -> Dict:
    """Set every prompt set of ``model`` to M patch tokens sampled as SPT's code does (see the module doc).

    ``dataset`` items are ``(image tensor, label)``; ``num_images`` is S (0: :func:`default_spt_images`).
    Returns the record: the image draw (dataset indices) and, per block, each prompt's (dataset index,
    patch index)."""
    check_prompts(model, "spt")
    n = len(dataset)
    if n < 1:
        raise ValueError("prompt_init=spt needs a non-empty training set")
    images = int(num_images) or default_spt_images(model, n)
    g = torch.Generator().manual_seed(int(seed))
    sample_idx: List[int] = torch.randint(n, size=(images,), generator=g).tolist()
    groups = insertion_groups(model)
    wanted = {block for block, _ in groups}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    m, dim, pre = model.num_prompts, model.embed_dim, model.backbone.num_prefix_tokens
    picks: Optional[List[torch.Tensor]] = None
    per_image = 0
    chosen = [torch.zeros(m, dim) for _ in groups]
    was_training = model.training
    model.eval()

    def gather(block: int, tokens: torch.Tensor, start: int) -> None:
        nonlocal picks, per_image
        if picks is None:  # the token draws, once N is known: one rand(S*N) per prompt set, in block order
            per_image = tokens.shape[1]
            if images * per_image < m:
                raise ValueError(f"prompt_init=spt: {images} image(s) x {per_image} patch tokens are fewer than "
                                 f"num_prompts={m}; raise spt_images")
            picks = [torch.argsort(torch.rand(images * per_image, generator=g), dim=0)[:m] for _ in groups]
        j = [b for b, _ in groups].index(block)
        s, t = picks[j] // per_image, picks[j] % per_image
        here = (s >= start) & (s < start + tokens.shape[0])
        chosen[j][here] = tokens[(s[here] - start).to(tokens.device), t[here].to(tokens.device)].float().cpu()

    last = max(wanted)
    for start, batch in image_chunks(dataset, sample_idx, seed, batch_size):
        batch = batch.to(device)
        if 1 in wanted:
            gather(1, patch_embedding(model, batch), start)
        if last > 1:
            for block, x in prompt_free_inputs(model, batch, last):
                if block > 1 and block in wanted:
                    gather(block, x[:, pre:], start)
    assert picks is not None
    record: Dict = {"images": images, "image_indices": sample_idx, "tokens_per_image": per_image, "blocks": {}}
    for (block, targets), rows, ids in zip(groups, chosen, picks):
        for name, row in targets:
            set_prompts(model, name, row, rows)
        record["blocks"][str(block)] = {
            "source": _source(block), "tensors": [f"{nm}[{r}]" for nm, r in targets],
            # prompt j = patch token t of training image i: [i, t] (i a dataset index, drawn with replacement)
            "tokens": [[sample_idx[int(r) // per_image], int(r) % per_image] for r in ids]}
    model.train(was_training)
    log.info("prompts initialised by SPT's sampler: %d patch token(s) per prompt set from %d training image(s) "
             "drawn with replacement, at block(s) %s", m, images, ", ".join(str(b) for b in sorted(wanted)))
    return record
