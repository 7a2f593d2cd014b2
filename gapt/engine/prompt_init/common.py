"""What the data-driven prompt inits share: training images loaded in chunks with their augmentation
seeded (the caller's RNG untouched), the prompt-free token stream of the model at step 0, and checks.

"The prompt-free model" is the model as built, before step 0, without its prompt tokens: the frozen
backbone's blocks run through ``gapt.model.blocks.block_forward`` (so weight parts wrapped inside
them, e.g. LoRA with B = 0 or SSF at its initial scale and shift, take part; LoRA, adapters and
temperatures start as the identity), with RoPE where the backbone has it.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch

from ...method import INIT_PROMPT_METHODS
from ...model.blocks import block_forward
from ...model.parts import BlockCall


def check_prompts(model, init: str) -> None:
    """The inits fill VPT's prompt tokens (gapt.method.INIT_PROMPT_METHODS), with any other part beside them."""
    method = str(getattr(model, "method", "?"))
    if getattr(model, "prompt_embeddings", None) is None or \
            not any(name in INIT_PROMPT_METHODS for name in method.split("+")):
        raise ValueError(f"prompt_init={init} fills VPT's prompt tokens: use it with "
                         f"{', '.join(INIT_PROMPT_METHODS)} (method '{method}')")


def image_chunks(dataset, indices: Sequence[int], seed: int, chunk: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """(offset, images (n, 3, H, W)) for ``dataset[i][0]``, i in ``indices`` in order, ``chunk`` at a time.

    The training transform's random draws (FGVC's crop and flip) come from one CPU RNG stream seeded
    ``seed`` and carried from chunk to chunk: the same images as loading all at once under
    ``torch.manual_seed(seed)``; the caller's global RNG is left exactly as it was."""
    state = None
    for start in range(0, len(indices), chunk):
        with torch.random.fork_rng(devices=[]):
            if state is None:
                torch.manual_seed(int(seed))
            else:
                torch.set_rng_state(state)
            images = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices[start:start + chunk]])
            state = torch.get_rng_state()
        yield start, images.float()


def patch_embedding(model, images: torch.Tensor) -> torch.Tensor:
    """(B, N, D) raw patch embeddings: ``patch_embed`` alone, no CLS, no position embedding (SPT's rep0)."""
    x = model.backbone.patch_embed(images)
    return x.flatten(1, 2) if x.ndim == 4 else x


def prompt_free_inputs(model, images: torch.Tensor, last_block: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """(l, tokens (B, prefix + N, D) entering 1-based block l) for l = 1..last_block, in the prompt-free
    model; each state is yielded before block l runs (the caller may hook that block)."""
    x = model.embed(images)
    rope = model.rope(x.shape[1] - model.backbone.num_prefix_tokens)
    for block in range(1, last_block + 1):
        yield block, x
        if block < last_block:
            x = block_forward(model.backbone.blocks[block - 1], x, BlockCall(rope=rope))


def insertion_groups(model) -> List[Tuple[int, List[Tuple[str, int]]]]:
    """[(1-based block, [(tensor name, row), ...])] in block order: where each prompt set enters."""
    by_block: dict = {}
    for name, row, block in model.prompt_insertions():
        by_block.setdefault(block, []).append((name, row))
    return sorted(by_block.items())


def set_prompts(model, name: str, row: int, value: torch.Tensor) -> None:
    param = getattr(model, name)
    with torch.no_grad():
        param[row].copy_(value.to(param.device, param.dtype))
