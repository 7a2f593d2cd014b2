"""One training run (SPEC §6): train, evaluate val every epoch, keep the best-val tuned state,
evaluate test once at the end on the best and the last state. Resumable, DDP-aware.

Which epoch a run reports (``metrics.selection``): with held-out val, the best-val epoch
(``test_top1`` = ``test_top1_best_val``); when val is inside the training data (a final run on
train + val) no epoch is chosen by val: the last one (``test_top1`` = ``test_top1_last``).
``test_top1_last`` is always there: the reference's protocol (SPEC §6), which reports compare with."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .. import config as C
from ..method import MethodSettings
from ..model import PromptedViT, build_model
from . import distributed as dist
from . import runfolder as rf
from .precision import autocast_dtype_for, precision_record, precision_scope
from .progress import Progress, summary
from .run import Run, check_finite, check_model_config, in_process_group, seed_everything
from .davpt_init import davpt_part, davpt_record, init_davpt
from .schedule import LRSchedule

log = logging.getLogger("gapt")


def loss_sync_interval(device: torch.device) -> int:
    """Training steps between reads of the loss on the host: each read waits for the GPU."""
    return 16 if device.type == "cuda" else 1


# -- set-up -----------------------------------------------------------------------------------
def model_from_config(cfg: C.RunConfig, num_classes: int, class_names=None) -> PromptedViT:
    with warnings.catch_warnings():
        if cfg.weights is None:
            warnings.simplefilter("ignore")
            log.warning("backbone %s built with random weights (weights: null)", cfg.backbone)
        model = build_model(cfg.backbone, MethodSettings.of(cfg), num_classes=num_classes, weights=cfg.weights,
                            image_size=cfg.image_size, class_names=class_names, random_seed=cfg.train.seed)
    model.seed_gate_noise(cfg.train.seed)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    return model


def make_optimizer(cfg: C.RunConfig, params) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params`` (tensors, or groups with their own weight decay: ``model.param_groups``)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _loader(dataset, batch_size: int, sampler, workers: int, seed: int = 0, pin: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)  # worker seeds derive from it: reproducible augmentation
    # pinned host memory lets .to(cuda, non_blocking=True) copy the next batch while the GPU computes
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=g,
                      persistent_workers=False, pin_memory=pin, drop_last=False)


@torch.no_grad()
def precompute_frozen(model: PromptedViT, dataset, batch_size: int, device, dtype, desc: str) -> TensorDataset:
    """Outputs of the frozen blocks for an un-augmented split, computed once (SPEC-equal logits)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    bar = Progress(len(loader), desc, enabled=dist.is_main())
    for x, y in loader:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats.append(model.frozen_features(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
        bar.update()
    bar.close()
    return TensorDataset(torch.cat(feats), torch.cat(labels))


# -- loops ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(forward: Callable, dataset, batch_size: int, device, dtype, workers: int = 0,
             desc: str = "eval") -> Dict[str, float]:
    """Top-1 (percent) and mean loss over ``dataset``, each sample counted once across processes."""
    loader = _loader(dataset, batch_size, dist.ShardSampler(len(dataset)), workers, pin=device.type == "cuda")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, loss: summed on the device, no sync per batch
    total = 0
    bar = Progress(len(loader), desc, enabled=dist.is_main())
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(x)
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        total += y.numel()
        bar.update()
    bar.close()
    correct, loss_sum = sums.tolist()
    correct, total, loss_sum = dist.all_sum([correct, total, loss_sum], device)
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "count": int(total)}


def train_one_epoch(model, forward: Callable, loader, optimizer, schedule: LRSchedule, epoch: int, device, dtype,
                    max_steps: int = 0, run_dir: Optional[Path] = None, clip_grad_value: float = 0.0) -> Dict[str, float]:
    """One epoch; ``clip_grad_value`` > 0 clamps each gradient element before the step (DA-VPT's recipe)."""
    model.train()
    steps = len(loader) if not max_steps else min(max_steps, len(loader))
    bar = Progress(steps, f"epoch {epoch + 1}", enabled=dist.is_main())  # epochs count from 1 for people
    loss_sum, seen, start, lr = 0.0, 0, time.time(), 0.0
    # On CUDA the losses are read every few steps (one wait for the GPU), so the next
    # batches are queued while it computes; the loss and step reported stay exact.
    pending: List[Tuple[int, torch.Tensor, int, float]] = []
    sync_every = loss_sync_interval(device)

    def flush() -> None:
        nonlocal loss_sum
        values = torch.stack([p[1] for p in pending]).tolist()
        check_finite(values, [f"epoch {epoch + 1} step {p[0]}" for p in pending], device,
                     run_dir / rf.RESUME if run_dir is not None else None,
                     "The state after the last finished epoch is kept in {path}",
                     "No epoch had finished, so there is no state to keep")
        for (step_i, _, n, step_lr), value in zip(pending, values):
            loss_sum += value * n
            bar.update(loss=value, lr=step_lr, img_s=seen * dist.world_size() / max(time.time() - start, 1e-9))
        pending.clear()

    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        lr = schedule.apply(optimizer, epoch, step)
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        if hasattr(model, "targets"):
            model.targets = y  # parts whose loss terms need the labels (DA-VPT) read them in this pass
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x).float(), y)
        if hasattr(model, "targets"):
            model.targets = None
        extra = getattr(model, "extra_losses", None)
        if extra:  # loss terms a method's parts added in this forward pass (e.g. a metric loss)
            loss = loss + sum(term.float() for term in extra)
        seen += y.numel()
        pending.append((step, loss.detach(), y.numel(), lr))
        if len(pending) >= sync_every:
            flush()  # before the update: on CPU a non-finite loss never reaches the tuned tensors
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_value > 0:
            torch.nn.utils.clip_grad_value_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_value)
        optimizer.step()
    if pending:
        flush()
    bar.close()
    elapsed = time.time() - start
    totals = dist.all_sum([loss_sum, seen], device)
    return {"loss": totals[0] / max(totals[1], 1), "lr": lr, "images_per_s": totals[1] / max(elapsed, 1e-9),
            "train_time_s": elapsed}


# -- state ------------------------------------------------------------------------------------
def tuned_state(model: PromptedViT) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.tuned_parameters().items()}


def set_tuned_state(model: PromptedViT, state: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in model.tuned_parameters().items():
            p.copy_(state[k])


# -- the run ----------------------------------------------------------------------------------
def train(cfg: C.RunConfig, resume: bool = False, stop_after_epoch: Optional[int] = None,
          prompt_initialiser: Optional[Callable] = None) -> Dict:
    """Run ``cfg`` to the end and return results.json's content.

    ``stop_after_epoch`` ends the process's work right after that epoch's resume file is written
    (as a kill would); tests use it to check that resuming gives the uninterrupted metrics.
    ``prompt_initialiser(model, train_set, seed=, device=)`` sets the prompts of a fresh run with a
    data-driven ``prompt_init`` (default: gapt.engine.prompt_init's prototype / spt / vipamin).
    """
    check_model_config(cfg)
    return in_process_group(cfg, lambda device: _train(Run(cfg, device, resume), stop_after_epoch,
                                                       prompt_initialiser))


def _train(run: Run, stop_after_epoch: Optional[int], prompt_initialiser: Optional[Callable]) -> Dict:
    from ..data import build_datasets
    cfg, device, dtype, out, t = run.cfg, run.device, run.dtype, run.out, run.cfg.train
    seed_everything(t.seed)

    bundle = build_datasets(cfg.data, image_size=cfg.image_size, seed=t.seed)
    model = model_from_config(cfg, bundle.num_classes, bundle.class_names).to(device)
    if cfg.prompt_init != "random" and not run.resume:  # once, before step 0; a resumed run has its prompts
        from .prompt_init import init_prompts
        init_prompts(cfg, model, bundle.train, t.seed, device, out, prompt_initialiser)
    davpt_init = None
    if davpt_part(model) is not None and not run.resume:  # DA-VPT's class -> proxy mapping, before step 0
        davpt_init = init_davpt(model, bundle.train, seed=t.seed, device=device)
    eval_bs = t.eval_batch_size or 2 * t.batch_size

    # Frozen leading blocks on un-augmented data are computed once, not every epoch.
    train_set, val_set = bundle.train, bundle.val
    cached = model.frozen_leading_blocks > 0 and not getattr(bundle.train, "augmented", True)
    if cached:
        model.eval()
        train_set = precompute_frozen(model, bundle.train, eval_bs, device, dtype, "cache train frozen blocks")
        val_set = precompute_frozen(model, bundle.val, eval_bs, device, dtype, "cache val frozen blocks")
        log.info("cached the output of %d frozen block(s) for train and val", model.frozen_leading_blocks)
    train_forward = run.wrap(_FromFrozen(model) if cached else model)

    sampler = dist.train_sampler(train_set, t.seed)
    workers = 0 if cached else cfg.data.num_workers
    loader = _loader(train_set, run.per_process_batch, sampler, workers, t.seed, device.type == "cuda")
    steps_per_epoch = len(loader) if not t.max_steps_per_epoch else min(t.max_steps_per_epoch, len(loader))
    optimizer = make_optimizer(cfg, model.param_groups(t.weight_decay, None if t.head_weight_decay < 0
                                                       else t.head_weight_decay, t.head_bias_decay))
    schedule = LRSchedule(t.lr, t.epochs, C.warmup_epochs(t), steps_per_epoch, t.schedule)

    start_epoch, best = 0, {"top1": -1.0, "epoch": -1, "state": None}
    train_time = 0.0
    if run.resume:
        state = run.load_state(model)
        set_tuned_state(model, state["tuned"])
        model.load_parts_state(state.get("parts", {}))  # e.g. DA-VPT's class -> proxy mapping
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, train_time = state["epoch"] + 1, state["train_time_s"]
        # resume files before epochs were numbered from 1 (no "epoch_base") hold a 0-based best epoch
        best_epoch = state["best_epoch"] + (0 if state.get("epoch_base") == 1 else 1)
        best = {"top1": state["best_top1"], "epoch": best_epoch, "state": state["best_tuned"]}
        run.keep_metrics(lambda r: r.get("epoch", -1) < start_epoch + 1)  # lines count epochs from 1
        log.info("resuming %s at epoch %d/%d", out, start_epoch + 1, t.epochs)
    # curves: one point per epoch at the optimizer-step count, continued (not repeated) on resume
    run.open_tracker(start_epoch * steps_per_epoch)

    val_forward = model.forward_from_frozen if cached else model
    # A final run may train on its val images (train + val): its val top-1 is no held-out score.
    held_out_val = bundle.info.get("val_held_out", True)
    if not held_out_val:
        log.info("final run: val is part of the training data, so no held-out val score is reported")
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        model.epoch_begin(epoch)
        stats = train_one_epoch(model, train_forward, loader, optimizer, schedule, epoch, device, dtype,
                                t.max_steps_per_epoch, out, t.clip_grad_value)
        model.epoch_end(epoch)
        train_time += stats.pop("train_time_s")
        model.eval()
        val = evaluate(val_forward, val_set, eval_bs, device, dtype, workers, desc="val")
        record = {"epoch": epoch + 1, **stats, "val_top1": val["top1"], "val_loss": val["loss"]}
        if t.eval_test_every_epoch:  # the reference protocol: costly, and test must not pick models
            record["test_top1"] = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test")["top1"]
        if held_out_val and val["top1"] > best["top1"]:  # val inside the training data chooses nothing
            best = {"top1": val["top1"], "epoch": epoch + 1, "state": tuned_state(model)}
        run.append_metrics(record, (epoch + 1) * steps_per_epoch, model)
        run.save_state({"epoch": epoch, "tuned": tuned_state(model), "optimizer": optimizer.state_dict(),
                        "best_top1": best["top1"], "best_epoch": best["epoch"], "best_tuned": best["state"],
                        "train_time_s": train_time, "epoch_base": 1, "parts": model.parts_state()}, model)
        if dist.is_main():
            shown = {k: v for k, v in record.items() if k != "epoch" and (held_out_val or not k.startswith("val_"))}
            log.info("epoch %d/%d %s", epoch + 1, t.epochs, summary(shown))
        dist.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            run.close()
            return {"stopped_after_epoch": epoch}

    # Test once: on the best-val state and on the last state, which are one state when the last
    # epoch was the best, or when val is not held out (then the last epoch is reported; test runs once).
    last_state = tuned_state(model)
    test_last = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test (last)")
    if not held_out_val:  # no val score, no best-val epoch: the last epoch is the run's number
        best = {"top1": None, "epoch": t.epochs, "state": None}
        metrics = {"test_top1": test_last["top1"], "test_top1_last": test_last["top1"],
                   "test_count": test_last["count"], "selection": "last", "selected_epoch": t.epochs}
    else:
        test_best = test_last
        if best["epoch"] != t.epochs:
            set_tuned_state(model, best["state"])
            test_best = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test (best val)")
        metrics = {"val_top1_best": best["top1"], "best_epoch": best["epoch"], "test_top1": test_best["top1"],
                   "test_top1_best_val": test_best["top1"], "test_top1_last": test_last["top1"],
                   "test_count": test_best["count"], "selection": "best-val", "selected_epoch": best["epoch"]}
    results = run.base_results(model, bundle.info.get("name") or cfg.data.name, cfg.data.final, metrics,
                               bundle.info, model.num_tuned(), train_time)
    results.update({"epochs": t.epochs, "frozen_cache_blocks": model.frozen_leading_blocks if cached else 0,
                    "tuned_params_by_part": model.tuned_counts(), **davpt_record(model, davpt_init),
                    "val_held_out": held_out_val, "backbone_params": sum(p.numel() for p in model.backbone.parameters())})

    def write_files() -> None:
        model.save_tuned(str(out / rf.TUNED), extra={"data": bundle.info, "best_epoch": best["epoch"]})
        if held_out_val:
            log.info("done: val top-1 %.2f (epoch %d), test top-1 %.2f (best val) / %.2f (last) -> %s",
                     best["top1"], best["epoch"], metrics["test_top1"], test_last["top1"], out)
        else:
            log.info("done (final run, no held-out val): test top-1 %.2f (last epoch, %d) -> %s",
                     test_last["top1"], t.epochs, out)

    run.finish(results, write_files, t.epochs * steps_per_epoch)
    set_tuned_state(model, last_state)
    return results


class _FromFrozen(torch.nn.Module):
    """DDP needs a module: this one maps cached frozen-block outputs to logits through the model."""

    def __init__(self, model: PromptedViT):
        super().__init__()
        self.model = model

    def forward(self, frozen):
        return self.model.forward_from_frozen(frozen)
