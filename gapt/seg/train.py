"""Segmentation training (`gapt seg train`): the prompted encoder + SETR-PUP heads, iteration-based.

The recipe is SPEC §6's (MMSegmentation ``setr_vit-l_pup_8xb2-160k_ade20k`` with the paper's
prompt settings): SGD with momentum, heads at ``seg.head_lr_mult`` x the prompt lr, poly decay
(power ``seg.poly_power``) of every group from its own base lr to the absolute floor
``seg.min_lr`` over ``seg.iterations`` (MMSegmentation's ``PolyLR`` with ``min_lr``), no
warm-up, ADE20K train augmentation at ``seg.crop_size``, val evaluated every ``seg.eval_every``
iterations by sliding-window inference. Only prompts, gates, temperatures (whatever the method
trains) and the heads learn; the backbone stays frozen and in eval mode.

Run folder (as classification's): ``config.yaml``, ``metrics.jsonl`` (a line per log interval and
per evaluation), ``last.pt`` (resume state, written atomically at every evaluation, every
``save_every`` iterations and at the end), ``tuned.safetensors`` (the final tuned state:
the reported model is the last one, as in SETR; ADE20K has no test split to select on) and
``results.json``.

Resuming is exact: the augmentation of an item depends only on (seed, pass over the data,
index), the sampler's order only on (seed, pass), and the resume state carries the RNG, the
optimizer and the partial log interval, so N iterations in one go and N/2 + resume N/2 give the
same tensors and the same metrics lines (timings aside).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import config as C
from ..engine import distributed as dist
from ..engine import runfolder as rf
from ..engine.precision import precision_record, precision_scope
from ..engine.progress import Progress
from ..engine.run import Run, check_model_config, in_process_group, seed_everything
from .evaluate import evaluate_seg, write_eval_file
from .head import SegmentationModel, seg_loss
from .model import build_seg_model, save_seg_tuned, seg_tuned_state, set_seg_tuned_state, sincos_mode
from .recipe import (HEAD_CHANNELS, check_seg_config, data_info, eval_pipeline, seg_dataset, seg_task_name,
                     train_pipeline)

log = logging.getLogger("gapt")


# -- schedule and optimizer ----------------------------------------------------------------------
def poly_lr(base_lr: float, iteration: int, total: int, power: float, min_lr: float) -> float:
    """MMSegmentation PolyLR: (base - min) * (1 - it / total) ** power + min."""
    progress = min(max(iteration / total, 0.0), 1.0)
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def make_seg_optimizer(cfg: C.RunConfig, model: SegmentationModel) -> torch.optim.Optimizer:
    t = cfg.train
    groups = model.param_groups(t.lr, cfg.seg.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def apply_poly(optimizer: torch.optim.Optimizer, cfg: C.RunConfig, iteration: int) -> float:
    """Set every group's lr for ``iteration`` (0-based); returns the prompt (base) lr."""
    sg = cfg.seg
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], iteration, sg.iterations, sg.poly_power, sg.min_lr)
    return poly_lr(cfg.train.lr, iteration, sg.iterations, sg.poly_power, sg.min_lr)


# -- sampling -----------------------------------------------------------------------------------
class PassSampler(DistributedSampler):
    """DistributedSampler (seeded order per pass via ``set_epoch``) that can start mid-pass."""

    def __init__(self, dataset, seed: int):
        super().__init__(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed,
                         drop_last=False)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (they drift apart when BatchNorm is not synced),
    so every process evaluates the state that is saved."""
    if dist.world_size() > 1:
        import torch.distributed as tdist
        for b in model.buffers():
            tdist.broadcast(b.data, src=0)


def _pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


# -- the run ------------------------------------------------------------------------------------
LOG_EVERY, SAVE_EVERY = 50, 1000


def train_seg(cfg: C.RunConfig, resume: bool = False, multi_scale: bool = False, log_every: Optional[int] = None,
              save_every: Optional[int] = None, stop_after: Optional[int] = None) -> Dict:
    """Run a segmentation config to the end; return results.json's content.

    ``multi_scale`` also evaluates multi-scale + flip at the end (``mIoU_ms``). ``log_every``:
    iterations per metrics line (plus one per evaluation; default 50); ``save_every``: iterations
    per resume file (plus one per evaluation and at the end; default 1000); both are kept in the
    resume state, so a resumed run goes on with the values it started with unless given.
    ``stop_after``: write the resume file after that iteration and return, as an interruption
    would (``{"stopped_after": it}``).
    """
    check_seg_config(cfg)
    check_model_config(cfg, size_key="seg.crop_size")
    return in_process_group(cfg, lambda device: _train_seg(Run(cfg, device, resume, "gapt seg train"), multi_scale,
                                                           log_every, save_every, stop_after))


def _resumed_sincos(run: Run, cfg: C.RunConfig) -> C.RunConfig:
    """A resumed run keeps the sin-cos table it trained on: a resume file from before
    ``seg.sincos_pos_embed`` existed was trained on the rebuilt one (its config.yaml lacks the key)."""
    if not run.resume or sincos_mode(cfg) is None:
        return cfg
    saved = torch.load(run.resume_path, map_location="cpu", weights_only=True).get("sincos_pos_embed", "rebuild")
    return replace(cfg, seg=replace(cfg.seg, sincos_pos_embed=saved))


def _train_seg(run: Run, multi_scale: bool, log_every: Optional[int], save_every: Optional[int],
               stop_after: Optional[int]) -> Dict:
    cfg, device, dtype, out, t, world = run.cfg, run.device, run.dtype, run.out, run.cfg.train, run.world
    sg = cfg.seg
    train_set = seg_dataset(cfg, "train", train_pipeline(cfg.seg.crop_size), t.seed)
    val_set = seg_dataset(cfg, "val", eval_pipeline(cfg.seg.crop_size), t.seed)
    info = data_info(cfg, train_set, val_set)
    cfg = _resumed_sincos(run, cfg)
    seed_everything(t.seed)
    model = build_seg_model(cfg, train_set.num_classes, train_set.class_names, channels=HEAD_CHANNELS)
    model = run.sync_batchnorm(model.to(device))
    optimizer = make_seg_optimizer(cfg, model)

    per_rank = run.per_process_batch
    sampler = PassSampler(train_set, t.seed)
    steps_per_pass = len(sampler) // per_rank
    if steps_per_pass == 0:
        raise C.ConfigError(f"bad value for config key 'train.batch_size': {t.batch_size} is larger than the "
                            f"{len(train_set)} training images")
    forward = run.wrap(model)

    iteration, train_time = 0, 0.0
    pending = {"loss_sum": 0.0, "images": 0, "iters": 0, "time": 0.0}
    last_eval = None  # SegMetrics of the latest evaluation
    if run.resume:
        state = run.load_state()
        set_seg_tuned_state(model, state["tuned"], str(run.resume_path))
        optimizer.load_state_dict(state["optimizer"])
        iteration, train_time = int(state["iteration"]), float(state["train_time_s"])
        pending = dict(state["pending"])
        log_every = log_every or int(state.get("log_every", LOG_EVERY))
        save_every = save_every or int(state.get("save_every", SAVE_EVERY))
        run.keep_metrics(lambda r: r.get("iteration", 0) <= iteration)
        log.info("resuming %s at iteration %d/%d", out, iteration, sg.iterations)

    log_every, save_every = log_every or LOG_EVERY, save_every or SAVE_EVERY
    if log_every < 1 or save_every < 1:
        raise ValueError(f"log_every and save_every must be >= 1, got {log_every} and {save_every}")
    run.open_tracker(iteration)

    def save_resume() -> None:
        run.save_state({"iteration": iteration, "tuned": seg_tuned_state(model), "optimizer": optimizer.state_dict(),
                        "pending": dict(pending), "train_time_s": train_time, "log_every": log_every,
                        "save_every": save_every, "sincos_pos_embed": sincos_mode(cfg)})

    def run_eval(desc: str, multi: bool = False):
        model.eval()
        _broadcast_buffers(model)
        return evaluate_seg(model, val_set, cfg.seg.crop_size, device, dtype, cfg.data.num_workers,
                            multi_scale=multi, desc=desc)

    eval_every = sg.eval_every
    bar = Progress(sg.iterations - iteration, "seg train", enabled=dist.is_main(), log_every=log_every)
    while iteration < sg.iterations:
        epoch, offset = divmod(iteration, steps_per_pass)
        sampler.set_epoch(epoch)
        sampler.skip = offset * per_rank
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(t.seed + epoch), drop_last=True,
                            pin_memory=device.type == "cuda")
        model.train()
        tick = time.time()
        for batch in loader:
            lr = apply_poly(optimizer, cfg, iteration)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = seg_loss(forward(images), labels)
            value = loss.item()  # one wait for the device per iteration (a segmentation step is long)
            run.check_finite([value], [f"iteration {iteration}"], "The last saved state is kept in {path}",
                             "No state had been saved yet")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            now = time.time()
            pending["loss_sum"] += value
            pending["images"] += images.shape[0] * world
            pending["iters"] += 1
            pending["time"] += now - tick
            train_time += now - tick
            bar.update(loss=value, lr=lr)
            evaluate_now = iteration == sg.iterations or (eval_every > 0 and iteration % eval_every == 0)
            if evaluate_now or iteration % log_every == 0:
                loss_sum, iters = dist.all_sum([pending["loss_sum"], pending["iters"]], device)
                record = {"iteration": iteration, "epoch": epoch + 1, "loss": loss_sum / max(iters, 1), "lr": lr,
                          "images_per_s": pending["images"] / max(pending["time"], 1e-9)}
                pending = {"loss_sum": 0.0, "images": 0, "iters": 0, "time": 0.0}
                if evaluate_now:
                    last_eval = run_eval(f"val @ {iteration}")
                    record.update(last_eval.as_dict())
                    model.train()
                run.append_metrics(record, iteration, model.encoder)
                if dist.is_main():
                    log.info("iteration %d/%d loss %.4f lr %.3g%s", iteration, sg.iterations, record["loss"], lr,
                             f" mIoU {_pct(last_eval.miou)}" if evaluate_now else "")
            if evaluate_now or iteration % save_every == 0 or iteration == stop_after:
                save_resume()
                dist.barrier()
            if iteration == stop_after and iteration < sg.iterations:
                bar.close()
                run.close()
                return {"stopped_after": iteration}
            if iteration >= sg.iterations:
                break
            tick = time.time()
    bar.close()

    if last_eval is None:  # resumed from the final state: evaluate it again
        last_eval = run_eval("val (final)")
    result_metrics = last_eval.as_dict()
    ms = run_eval("val multi-scale", multi=True) if multi_scale else None
    if ms is not None:
        result_metrics.update({f"{k}_ms": v for k, v in ms.as_dict().items()})
    enc = model.encoder
    results = run.base_results(enc, seg_task_name(cfg), True, result_metrics, info,
                               sum(p.numel() for p in model.parameters() if p.requires_grad), train_time)
    results.update({"encoder_tuned_params": enc.num_tuned(), "aux_blocks": list(model.aux_blocks),
                    "crop_size": cfg.seg.crop_size, "iterations": sg.iterations, "head_lr_mult": sg.head_lr_mult,
                    "sincos_pos_embed": sincos_mode(cfg)})

    def write_files() -> None:
        save_seg_tuned(out / rf.TUNED, cfg, model, extra={"data": info, "iteration": iteration})
        write_eval_file(out, "val", last_eval, ms, {"iteration": iteration})
        log.info("done: val mIoU %s%s -> %s", _pct(last_eval.miou),
                 f" (multi-scale {_pct(ms.miou)})" if ms is not None else "", out)

    return run.finish(results, write_files, iteration)


def train_seg_multi_scale(cfg: C.RunConfig, resume: bool = False) -> Dict:
    """train_seg with the multi-scale + flip evaluation at the end (mIoU_ms): what `gapt reproduce`'s
    ADE20K runs call through the sweep executors (``gapt.seg.train:train_seg_multi_scale``)."""
    return train_seg(cfg, resume=resume, multi_scale=True)
