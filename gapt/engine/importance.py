"""E2VPT's importance scores of its prompt masks (SPEC §12.4(d) step 3), as the official code computes them.

ChengHan111/E2VPT @ 7a66e75e, ``src/engine/trainer.py::calculate_importance`` (called by
``tune_vtab_PruningRewind_CVK.py::cal_mt_mtp`` on a freshly built trainer):

- the model is the pre-pruning run at its last epoch (``last_model.pth``; here the run's resume file, whose
  ``tuned`` state is the last epoch's), set to eval mode once (``prompt_model.eval()``: no prompt dropout);
- one pass over the training loader (shuffled, as in training; batch ``train.batch_size``), each batch through
  ``forward_one_batch(..., is_train=True)``: cross-entropy, ``zero_grad``, ``backward`` and **``optimizer.step()``**,
  then the masks' gradients are added up: gamma.grad (M_p,) and r.grad (M_p, 16);
- the sums are divided by the number of batches: the signed mean gradient, no absolute value
  (``NORMALIZE_SCORES_BY_TOKEN`` is False by default: no normalisation).

The optimizer is the recipe's (SGD, momentum, weight decay) and, as on the official fresh trainer, its lr is the
schedule's first epoch: the reference steps its warm-up + cosine schedule per epoch, so with warm-up epochs
(10 in every released config) that lr is 0 and the steps leave the weights as they are; with no warm-up it is
the base lr and the weights drift during the pass, as they do in the official code.

Sign convention (SPEC §12.4(g)2, not settled): masks are then taken in ascending score order. To first order,
setting a mask entry from 1 to 0 changes the loss by -g, so the lowest (most negative) g marks the entries whose
removal raises the loss most. gapt follows the code (``gapt e2vpt-prune --reverse`` takes descending order,
the official ``MASK_RESERVE=True``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import config as C
from ..model.parts.kv_prompts import mask_gradients
from . import distributed as dist
from . import runfolder as rf
from .run import autocast_dtype, in_process_group, seed_everything
from .schedule import LRSchedule
from .trainer import _loader, make_optimizer, model_from_config, set_tuned_state

log = logging.getLogger("gapt")

JOB_FILE, IMPORTANCE_FILE = "job.json", "importance.json"


def last_tuned_state(run_dir: Path) -> Dict[str, torch.Tensor]:
    """The tuned tensors of a finished run's last epoch (its resume file), E2VPT's ``last_model.pth``."""
    run_dir = Path(run_dir)
    if not (run_dir / rf.RESULTS).exists() or not (run_dir / rf.RESUME).exists():
        raise rf.RunFolderError(f"{run_dir} is not a finished run with its resume file ({rf.RESULTS}, {rf.RESUME}): "
                                f"the importance pass needs the last epoch's state")
    return torch.load(run_dir / rf.RESUME, map_location="cpu", weights_only=True)["tuned"]


def mask_importance(cfg: C.RunConfig, tuned: Dict[str, torch.Tensor], workers: Optional[int] = None) -> Dict:
    """calculate_importance on ``cfg``'s training split, the model holding ``tuned``: the mean over batches of
    d loss / d gamma and d loss / d r, while the optimizer steps as the official pass does. Runs on
    ``cfg.device`` at ``cfg.train.precision`` (fp32: TF32 off), one process."""
    return in_process_group(cfg, lambda device: _importance(cfg, tuned, device, workers))


def _importance(cfg: C.RunConfig, tuned: Dict[str, torch.Tensor], device: torch.device, workers: Optional[int]) -> Dict:
    from ..data import build_datasets
    seed_everything(cfg.train.seed)
    bundle = build_datasets(cfg.data, image_size=cfg.image_size, seed=cfg.train.seed, splits=("train",))
    model = model_from_config(cfg, bundle.num_classes, bundle.class_names).to(device)
    set_tuned_state(model, tuned)
    t = cfg.train
    sampler = dist.train_sampler(bundle.train, t.seed)
    loader = _loader(bundle.train, t.batch_size, sampler, cfg.data.num_workers if workers is None else workers, t.seed,
                     device.type == "cuda")
    optimizer = make_optimizer(cfg, model.param_groups(t.weight_decay, None if t.head_weight_decay < 0  # as _train
                                                       else t.head_weight_decay, t.head_bias_decay))
    schedule = LRSchedule(t.lr, t.epochs, C.warmup_epochs(t), len(loader), "cosine_epoch")  # the reference's steps
    dtype = autocast_dtype(cfg, device)
    tokens = torch.zeros(model.num_prompts, device=device)
    pieces = None
    model.eval()  # calculate_importance: eval mode for the whole pass
    batches, lrs = 0, set()
    for x, y in loader:
        lrs.add(schedule.apply(optimizer, 0, batches))
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # forward_one_batch(is_train=True) steps; the gradients are read after it
        g_tokens, g_pieces = mask_gradients(model)
        tokens += g_tokens.detach()
        pieces = g_pieces.detach().clone() if pieces is None else pieces + g_pieces.detach()
        batches += 1
    if not batches:
        raise ValueError("the importance pass found no training batch")
    return {"token_scores": (tokens / batches).tolist(), "piece_scores": (pieces / batches).tolist(),
            "batches": batches, "images": len(bundle.train), "lr": sorted(lrs), "eval_mode": True,
            "score": "signed mean gradient of the loss w.r.t. the mask, over the training batches"}


def importance_job(folder: Path, resume: bool = False) -> None:
    """A sweep job (``module:function`` target): the pass for the run named in ``folder/job.json``; writes
    importance.json, then results.json (the mark of a finished job)."""
    folder = Path(folder)
    spec = json.loads((folder / JOB_FILE).read_text())
    run_dir = Path(spec["run"])
    cfg = C.load_config(str(run_dir / rf.CONFIG), saved=True)
    if spec.get("device"):
        cfg.device = spec["device"]
    if os.environ.get("GAPT_SWEEP_GPU") == "1" and str(cfg.device).startswith("cuda:"):
        cfg.device = "cuda"  # a sweep worker sees its one GPU (CUDA_VISIBLE_DEVICES) as cuda:0
    log.info("E2VPT importance pass over %s's training split (the last epoch's state)", run_dir)
    scores = mask_importance(cfg, last_tuned_state(run_dir))
    scores["run"] = str(run_dir)
    rf.write_json(folder / IMPORTANCE_FILE, scores)
    rf.write_json(folder / rf.RESULTS, {"kind": "e2vpt-importance", "run": str(run_dir), "batches": scores["batches"]})
