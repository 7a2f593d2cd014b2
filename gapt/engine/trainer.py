"""One training run (SPEC §6): train, evaluate val every epoch, keep the best-val tuned state,
evaluate test once at the end on the best and the last state. Resumable, DDP-aware."""
from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .. import config as C
from ..model import PromptedViT, build_model
from . import distributed as dist
from . import runfolder as rf
from . import tracking
from .precision import autocast_dtype_for, precision_record, precision_scope
from .progress import Progress, summary
from .schedule import LRSchedule

log = logging.getLogger("gapt")


def loss_sync_interval(device: torch.device) -> int:
    """Training steps between reads of the loss on the host: each read waits for the GPU."""
    return 16 if device.type == "cuda" else 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the resume state of the last finished epoch, if any, stays in the run folder."""


# -- set-up -----------------------------------------------------------------------------------
def resolve_device(cfg: C.RunConfig) -> torch.device:
    """``auto`` and ``cuda`` mean this process's GPU: cuda:LOCAL_RANK under torchrun, else cuda:0.

    The GPU is also made current, so NCCL and any kernel launched without a device land on it
    (with several processes on one machine, an unset current device puts every rank on GPU 0).
    """
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise C.ConfigError(f"bad value for config key 'device': {cfg.device!r} but no CUDA device is available")
    device = torch.device("cuda", dist.local_rank()) if kind == "cuda" else torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast_dtype(cfg: C.RunConfig, device: torch.device) -> Optional[torch.dtype]:
    return autocast_dtype_for(cfg.train.precision, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_from_config(cfg: C.RunConfig, num_classes: int, class_names=None) -> PromptedViT:
    with warnings.catch_warnings():
        if cfg.weights is None:
            warnings.simplefilter("ignore")
            log.warning("backbone %s built with random weights (weights: null)", cfg.backbone)
        model = build_model(cfg.backbone, method=cfg.method, num_prompts=cfg.num_prompts, num_classes=num_classes,
                            gate_init=cfg.gate_init, learn_temperature=cfg.learn_temperature,
                            insert_at_block=cfg.insert_at_block, weights=cfg.weights, image_size=cfg.image_size,
                            prompt_dropout=cfg.prompt_dropout, pooling=cfg.pooling or None, class_names=class_names,
                            random_seed=cfg.train.seed, gate_type=cfg.gate_type,
                            gate_temperature=cfg.gate_temperature)
    model.seed_gate_noise(cfg.train.seed)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    return model


def make_optimizer(cfg: C.RunConfig, params) -> torch.optim.Optimizer:
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
def precompute_prefix(model: PromptedViT, dataset, batch_size: int, device, dtype, desc: str) -> TensorDataset:
    """Outputs of the frozen blocks for an un-augmented split, computed once (SPEC-equal logits)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    bar = Progress(len(loader), desc, enabled=dist.is_main())
    for x, y in loader:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats.append(model.frozen_prefix(x.to(device)).float().cpu())
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
                    max_steps: int = 0, run_dir: Optional[Path] = None) -> Dict[str, float]:
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
        bad = [0.0 if math.isfinite(v) else 1.0 for v in values]
        if dist.world_size() > 1:  # every process stops at the same step, none waits in a collective
            bad = dist.all_sum(bad, device)
        for (step_i, _, n, step_lr), value, bad_here in zip(pending, values, bad):
            if bad_here:
                kept = run_dir is not None and (run_dir / rf.RESUME).exists()
                what = f"loss is {value}" if not math.isfinite(value) else "the loss is not finite in another process"
                raise TrainingDiverged(f"{what} at epoch {epoch + 1} step {step_i}; stopped. " + (
                    f"The state after the last finished epoch is kept in {run_dir / rf.RESUME}" if kept else
                    "No epoch had finished, so there is no state to keep") + "; a lower train.lr may help")
            loss_sum += value * n
            bar.update(loss=value, lr=step_lr, img_s=seen * dist.world_size() / max(time.time() - start, 1e-9))
        pending.clear()

    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        lr = schedule.apply(optimizer, epoch, step)
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x).float(), y)
        seen += y.numel()
        pending.append((step, loss.detach(), y.numel(), lr))
        if len(pending) >= sync_every:
            flush()  # before the update: on CPU a non-finite loss never reaches the tuned tensors
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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


def rng_state(model: Optional[PromptedViT] = None) -> Dict:
    out = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_pos": random.getstate()[2],
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if model is not None and model.gate_noise is not None:  # hard gates' Gumbel stream
        out["gate_noise"] = model.gate_noise.get_state()
    return out


def set_rng_state(s: Dict, model: Optional[PromptedViT] = None) -> None:
    if model is not None and model.gate_noise is not None and "gate_noise" in s:
        model.gate_noise.set_state(s["gate_noise"])
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -- the run ----------------------------------------------------------------------------------
def train(cfg: C.RunConfig, resume: bool = False, stop_after_epoch: Optional[int] = None,
          prompt_initialiser: Optional[Callable] = None) -> Dict:
    """Run ``cfg`` to the end and return results.json's content.

    ``stop_after_epoch`` ends the process's work right after that epoch's resume file is written
    (as a kill would); tests use it to check that resuming gives the uninterrupted metrics.
    """
    check_model_config(cfg)
    device = resolve_device(cfg)
    with dist.process_group(device.type), precision_scope(cfg.train.precision, device):  # fp32: TF32 off
        return _train(cfg, device, resume, stop_after_epoch, prompt_initialiser)


def check_model_config(cfg: C.RunConfig, size_key: str = "image_size") -> None:
    """Backbone name, weights file, image size vs patch size, insertion block: before any data or file."""
    from ..model.preflight import check_model_settings
    check_model_settings(cfg.backbone, cfg.weights, getattr(cfg, size_key), cfg.method, cfg.insert_at_block,
                         size_key)


def _train(cfg: C.RunConfig, device: torch.device, resume: bool, stop_after_epoch: Optional[int],
           prompt_initialiser: Optional[Callable]) -> Dict:
    from ..data import build_datasets
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    dtype = autocast_dtype(cfg, device)
    t = cfg.train
    if t.batch_size % dist.world_size():
        raise C.ConfigError(f"bad value for config key 'train.batch_size': {t.batch_size} does not divide over "
                            f"{dist.world_size()} processes")
    tracking.resolve_logger(t.logger)  # a missing package fails before any work
    if dist.is_main():  # the config is valid: only now is anything written
        if not resume:
            rf.check_new_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # lines left by a fresh start killed before its first resume file
            rf.atomic_write_text(out / rf.METRICS, "")
        rf.atomic_write_text(out / rf.CONFIG, C.to_yaml(cfg))
    seed_everything(t.seed)

    bundle = build_datasets(cfg.data, image_size=cfg.image_size, seed=t.seed)
    model = model_from_config(cfg, bundle.num_classes, bundle.class_names).to(device)
    if cfg.prompt_init == "prototype" and not resume:
        from ..protocol.prototype import init_prompts_from_prototypes
        (prompt_initialiser or init_prompts_from_prototypes)(model, bundle.train, seed=t.seed, device=device)
    eval_bs = t.eval_batch_size or 2 * t.batch_size

    # Frozen blocks on un-augmented data are computed once, not every epoch.
    train_set, val_set, forward_fn = bundle.train, bundle.val, model
    cached = model.frozen_prefix_blocks > 0 and not getattr(bundle.train, "augmented", True)
    if cached:
        model.eval()
        train_set = precompute_prefix(model, bundle.train, eval_bs, device, dtype, "cache train prefix")
        val_set = precompute_prefix(model, bundle.val, eval_bs, device, dtype, "cache val prefix")
        log.info("cached the output of %d frozen block(s) for train and val", model.frozen_prefix_blocks)
    train_forward = model.forward_from_prefix if cached else model
    ddp_model = None
    if dist.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(_PrefixForward(model) if cached else model,
                                            device_ids=[device.index] if device.type == "cuda" else None)
        train_forward = ddp_model
    if t.compile:
        train_forward = torch.compile(train_forward)
        log.info("train.compile: the first training steps compile the model; the first epoch's images/s "
                 "includes that time")

    sampler = dist.train_sampler(train_set, t.seed)
    workers = 0 if cached else cfg.data.num_workers
    loader = _loader(train_set, t.batch_size // dist.world_size(), sampler, workers, t.seed, device.type == "cuda")
    steps_per_epoch = len(loader) if not t.max_steps_per_epoch else min(t.max_steps_per_epoch, len(loader))
    optimizer = make_optimizer(cfg, list(model.tuned_parameters().values()))
    schedule = LRSchedule(t.lr, t.epochs, C.warmup_epochs(t), steps_per_epoch, t.schedule)

    start_epoch, best = 0, {"top1": -1.0, "epoch": -1, "state": None}
    train_time = 0.0
    if resume:
        state = torch.load(out / rf.RESUME, map_location="cpu", weights_only=True)
        set_tuned_state(model, state["tuned"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, train_time = state["epoch"] + 1, state["train_time_s"]
        # resume files before epochs were numbered from 1 (no "epoch_base") hold a 0-based best epoch
        best_epoch = state["best_epoch"] + (0 if state.get("epoch_base") == 1 else 1)
        best = {"top1": state["best_top1"], "epoch": best_epoch, "state": state["best_tuned"]}
        set_rng_state(state["rng"], model)
        if dist.is_main():
            rf.truncate_metrics(out, start_epoch + 1)
        log.info("resuming %s at epoch %d/%d", out, start_epoch + 1, t.epochs)
    # curves: one point per epoch at the optimizer-step count, continued (not repeated) on resume
    tracker = tracking.open_tracker(t.logger, out, start_step=start_epoch * steps_per_epoch, resume=resume,
                                    config=C.to_dict(cfg), config_text=C.to_yaml(cfg), enabled=dist.is_main())

    val_forward = model.forward_from_prefix if cached else model
    # A final run may train on its val images (train + val): its val top-1 is no held-out score.
    held_out_val = bundle.info.get("val_held_out", True)
    if not held_out_val:
        log.info("final run: val is part of the training data, so no held-out val score is reported")
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, train_forward, loader, optimizer, schedule, epoch, device, dtype,
                                t.max_steps_per_epoch, out)
        train_time += stats.pop("train_time_s")
        model.eval()
        val = evaluate(val_forward, val_set, eval_bs, device, dtype, workers, desc="val")
        record = {"epoch": epoch + 1, **stats, "val_top1": val["top1"], "val_loss": val["loss"]}
        if t.eval_test_every_epoch:  # the reference protocol: costly, and test must not pick models
            record["test_top1"] = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test")["top1"]
        if val["top1"] > best["top1"]:
            best = {"top1": val["top1"], "epoch": epoch + 1, "state": tuned_state(model)}
        if dist.is_main():
            rf.append_metrics(out, record)
            tracker.log_record(record, (epoch + 1) * steps_per_epoch, model)
            rf.atomic_torch_save({"epoch": epoch, "tuned": tuned_state(model), "optimizer": optimizer.state_dict(),
                                  "best_top1": best["top1"], "best_epoch": best["epoch"], "best_tuned": best["state"],
                                  "rng": rng_state(model), "train_time_s": train_time, "epoch_base": 1}, out / rf.RESUME)
            shown = {k: v for k, v in record.items() if k != "epoch" and (held_out_val or not k.startswith("val_"))}
            log.info("epoch %d/%d %s", epoch + 1, t.epochs, summary(shown))
        dist.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            tracker.close()
            return {"stopped_after_epoch": epoch}

    # Test once: on the best-val state (what the run reports) and on the last state, which
    # are one state when the last epoch was the best (then test runs once).
    last_state = tuned_state(model)
    test_last = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test (last)")
    if best["epoch"] == t.epochs:
        test_best = test_last
    else:
        set_tuned_state(model, best["state"])
        test_best = evaluate(model, bundle.test, eval_bs, device, dtype, workers, "test (best val)")
    results = {
        "backbone": cfg.backbone, "method": cfg.method, "learn_temperature": cfg.learn_temperature,
        "num_prompts": model.num_prompts, "prompt_init": cfg.prompt_init, "gate_init": cfg.gate_init,
        "insert_at_block": cfg.insert_at_block, "benchmark": cfg.data.format, "task": bundle.info.get("name") or
        cfg.data.name, "seed": t.seed, "final": cfg.data.final,
        "metrics": {"val_top1_best": best["top1"], "best_epoch": best["epoch"], "test_top1": test_best["top1"],
                    "test_top1_last": test_last["top1"], "test_count": test_best["count"]},
        "data": bundle.info, "tuned_params": model.num_tuned(), "train_time_s": train_time,
        "epochs": t.epochs, "device": str(device), **precision_record(t.precision, device),
        "pos_embed_interpolation": model.pos_embed_interpolation,
        "world_size": dist.world_size(), "lr": t.lr, "weight_decay": t.weight_decay,
        "prefix_cache_blocks": model.frozen_prefix_blocks if cached else 0, "val_held_out": held_out_val,
        "gate_type": cfg.gate_type, "gate_temperature": cfg.gate_temperature, "batch_size": t.batch_size,
        "prompt_dropout": cfg.prompt_dropout, "pooling": model.pooling,
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
    }
    if dist.is_main():
        model.save_tuned(str(out / rf.TUNED), extra={"data": bundle.info, "best_epoch": best["epoch"]})
        rf.write_json(out / rf.RESULTS, results)
        tracker.log_results(results["metrics"], t.epochs * steps_per_epoch)
        if held_out_val:
            log.info("done: val top-1 %.2f (epoch %d), test top-1 %.2f (best val) / %.2f (last) -> %s",
                     best["top1"], best["epoch"], test_best["top1"], test_last["top1"], out)
        else:
            log.info("done (final run, no held-out val): test top-1 %.2f (state of epoch %d) / %.2f (last) -> %s",
                     test_best["top1"], best["epoch"], test_last["top1"], out)
    set_tuned_state(model, last_state)
    tracker.close()
    dist.barrier()
    return results


class _PrefixForward(torch.nn.Module):
    """DDP needs a module: this one maps cached prefixes to logits through the model."""

    def __init__(self, model: PromptedViT):
        super().__init__()
        self.model = model

    def forward(self, prefix):
        return self.model.forward_from_prefix(prefix)


def config_for_resume(run_dir: str) -> C.RunConfig:
    path = Path(run_dir) / rf.CONFIG
    if not Path(run_dir).is_dir():
        raise rf.RunFolderError(f"run folder {run_dir} does not exist; nothing to resume")
    if not (Path(run_dir) / rf.RESUME).exists():
        raise rf.RunFolderError(f"{run_dir} has no resume file ({rf.RESUME}); nothing to resume")
    cfg = C.load_config(str(path))
    return replace(cfg, out=str(run_dir))
