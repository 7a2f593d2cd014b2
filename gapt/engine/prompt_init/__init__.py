"""Data-driven prompt initialisations: one pass over training images through the prompt-free model,
run once before step 0 of a fresh run and recorded in its folder (DESIGN.md, "init" hook point).

    prototype   k-means centres of patch tokens (gapt/engine/prototype.py): SPT's paper variant
    spt         SPT's released sampler: single patch tokens of training images (spt.py, SPEC §12.1)
    vipamin     VIPAMIN's matching + orthogonal prompts (vipamin.py, SPEC §12.2)

Each fills the prompt sets ``PromptedViT.prompt_insertions()`` names, so it works for every prompt
placement (vpt-shallow, vpt-deep, vpt-at-block, gated) and for any part composed with it (gates and
temperatures leave the pass unchanged at their start values). ``prompt_init.json`` in the run folder
says what was drawn: the init, its settings and seed, the training images (dataset indices) and, per
block, where each prompt came from. A resumed run reads its prompts from the resume file and does
not redo the init.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from .spt import default_spt_images, init_prompts_spt
from .vipamin import VIPAMIN_BATCH, VIPAMIN_SEED, init_prompts_vipamin

log = logging.getLogger("gapt")

RECORD = "prompt_init.json"

__all__ = ["init_prompts", "init_prompts_spt", "init_prompts_vipamin", "default_spt_images", "RECORD",
           "VIPAMIN_SEED", "VIPAMIN_BATCH"]


def init_prompts(settings, model, train_set, seed: int, device, out: Optional[Path] = None,
                 initialiser: Optional[Callable] = None) -> Dict:
    """Run ``settings.prompt_init`` (a RunConfig or MethodSettings) on ``model`` and write ``out/prompt_init.json``.

    ``seed``: the run's ``train.seed`` (prototype and spt draw from it; vipamin always uses seed 0, as
    its scripts). ``initialiser(model, train_set, seed=, device=)`` replaces the built-in function
    (tests, experiments). Only the main process of a DDP run writes the file."""
    init = settings.prompt_init
    start = time.perf_counter()
    if initialiser is not None:
        record = initialiser(model, train_set, seed=seed, device=device) or {}
    elif init == "prototype":
        from ..prototype import init_prompts_from_prototypes
        record = init_prompts_from_prototypes(model, train_set, seed=seed, device=device)
    elif init == "spt":
        record = init_prompts_spt(model, train_set, seed=seed, device=device, num_images=settings.spt_images)
    elif init == "vipamin":
        record = init_prompts_vipamin(model, train_set, k=settings.vipamin_k, lam=settings.vipamin_lambda,
                                      device=device)
    else:
        raise ValueError(f"unknown prompt_init {init!r}")
    header = {"prompt_init": init, "method": model.method, "num_prompts": model.num_prompts,
              "seed": VIPAMIN_SEED if init == "vipamin" else int(seed), "train_size": len(train_set),
              "time_s": round(time.perf_counter() - start, 3)}
    if init == "spt":
        header["spt_images"] = settings.spt_images
    if init == "vipamin":
        header.update(vipamin_k=settings.vipamin_k, vipamin_lambda=settings.vipamin_lambda)
    full = {**header, **{k: v for k, v in record.items() if k not in header}}
    if out is not None:
        from .. import distributed as dist
        from ..runfolder import write_json
        if dist.is_main():
            write_json(Path(out) / RECORD, full)
    where = f"; recorded in {Path(out) / RECORD}" if out is not None else ""
    log.info("prompt_init=%s took %.1f s%s", init, header["time_s"], where)
    return full
