"""Segmentation training (`gapt seg train`): the prompted encoder + SETR-PUP heads, iteration-based.

The recipe is SPEC §6's (MMSegmentation ``setr_vit-l_pup_8xb2-160k_ade20k`` with the paper's
prompt settings): SGD with momentum, heads at ``train.head_lr_mult`` x the prompt lr, poly decay
(power ``train.poly_power``) of every group from its own base lr to the absolute floor
``train.min_lr`` over ``train.iterations`` (MMSegmentation's ``PolyLR`` with ``min_lr``), no
warm-up, ADE20K train augmentation at ``crop_size``, val evaluated every ``train.eval_every``
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

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import config as C
from ..engine import distributed as dist
from ..engine import runfolder as rf
from ..engine import tracking
from ..engine.precision import precision_record, precision_scope
from ..engine.progress import Progress
from ..model.tuned import SEG_FORMAT
from ..engine.trainer import (TrainingDiverged, autocast_dtype, check_model_config, resolve_device, rng_state,
                              seed_everything, set_rng_state)
from .data import SegDataset, build_ade20k, build_folder_seg
from .head import SegmentationModel, seg_loss
from .transforms import SegEvalPipeline, SegTrainPipeline

log = logging.getLogger("gapt")

SEG_FORMATS = ("ade20k", "seg_folder")
TUNED_FORMAT = SEG_FORMAT  # defined beside the classification format: analyses read both
REFERENCE_DEPTH, REFERENCE_AUX_BLOCKS = 12, (5, 9)   # the paper's ViT-B choice (SPEC §6)
HEAD_CHANNELS = 256
SEG_POS_EMBED_INTERPOLATION = "bilinear"   # MMSegmentation SETR's interpolate_mode (classification: bicubic)
EVAL_FILE = "eval_{split}.json"


# -- recipe values derived from crop_size and depth ----------------------------------------------
def aux_blocks_for_depth(depth: int) -> Tuple[int, ...]:
    """Auxiliary-head blocks (1-based): (5, 9) for 12 blocks, the same relative depths otherwise.

    Block b of 12 maps to round(b * depth / 12), clamped to 1..depth, duplicates merged:
    4 blocks -> (2, 3), 6 -> (3, 5), 24 -> (10, 18), 32 -> (13, 24).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    out: List[int] = []
    for b in REFERENCE_AUX_BLOCKS:
        k = min(max(int(math.floor(b * depth / REFERENCE_DEPTH + 0.5)), 1), depth)
        if k not in out:
            out.append(k)
    return tuple(out)


def train_scale(crop_size: int) -> Tuple[int, int]:
    """The resize target before the random ratio: (2048, 512) for a 512 crop, 4:1 in general."""
    return 4 * crop_size, crop_size


def slide_stride(crop_size: int) -> int:
    """Sliding-window stride: two thirds of the crop, rounded (341 for 512)."""
    return max(int(round(crop_size * 2 / 3)), 1)


# -- config checks ------------------------------------------------------------------------------
def check_seg_config(cfg: C.RunConfig) -> None:
    if cfg.data.format not in SEG_FORMATS:
        raise C.ConfigError(f"bad value for config key 'data.format': {cfg.data.format!r}; `gapt seg` needs one "
                            f"of {list(SEG_FORMATS)}")
    if not cfg.data.root:
        raise C.ConfigError("config key 'data.root' is empty: point it at the dataset folder")
    if cfg.crop_size <= 0:
        raise C.ConfigError(f"bad value for config key 'crop_size': {cfg.crop_size} (must be > 0)")
    t = cfg.train
    if t.iterations <= 0:
        raise C.ConfigError(f"bad value for config key 'train.iterations': {t.iterations}; segmentation is "
                            "iteration-based, set it (the SETR recipe: 160000)")
    if t.eval_every < 0:
        raise C.ConfigError(f"bad value for config key 'train.eval_every': {t.eval_every} (must be >= 0)")
    if t.head_lr_mult <= 0:
        raise C.ConfigError(f"bad value for config key 'train.head_lr_mult': {t.head_lr_mult} (must be > 0)")
    if t.poly_power < 0:
        raise C.ConfigError(f"bad value for config key 'train.poly_power': {t.poly_power} (must be >= 0)")
    if not 0 <= t.min_lr <= t.lr:
        raise C.ConfigError(f"bad value for config key 'train.min_lr': {t.min_lr} (must be in [0, train.lr={t.lr}])")
    if cfg.prompt_init != "random":
        raise C.ConfigError(f"bad value for config key 'prompt_init': {cfg.prompt_init!r}; `gapt seg` supports "
                            "'random' only")
    if cfg.gate_type != "soft":  # the paper's hard gates are a classification ablation (Table 4)
        raise C.ConfigError(f"bad value for config key 'gate_type': {cfg.gate_type!r}; `gapt seg` supports 'soft' only")


# -- data ---------------------------------------------------------------------------------------
def seg_task_name(cfg: C.RunConfig) -> str:
    return "ade20k" if cfg.data.format == "ade20k" else (Path(cfg.data.root).name or "seg_folder")


def seg_dataset(cfg: C.RunConfig, split: str, pipeline, seed: int = 0) -> SegDataset:
    """One split: ``train``/``val`` (or a format's own split name) through ``pipeline``.

    ADE20K's labels are not pixel-scanned at construction (22k masks; a bad value is still
    reported when its item loads); folder datasets are scanned.
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}'; valid: train, val")
    if d.format == "ade20k":
        name = (d.train_split or "training") if split == "train" else (d.val_split or "validation")
        return build_ade20k(d.root, name, pipeline, check_labels=False, seed=seed)
    root = Path(d.root)
    if not root.is_dir():
        raise ValueError(f"segmentation root folder not found: {root}")
    name = (d.train_split or "train") if split == "train" else (d.val_split or "val")
    return build_folder_seg(root / "images" / name, root / "masks" / name, root / "classes.txt", pipeline,
                            check_labels=True, seed=seed)


def eval_pipeline(crop_size: int) -> SegEvalPipeline:
    return SegEvalPipeline(scale=train_scale(crop_size))


def data_info(cfg: C.RunConfig, train: Optional[SegDataset], val: SegDataset) -> Dict:
    info = {"format": cfg.data.format, "root": cfg.data.root, "task": seg_task_name(cfg),
            "num_classes": val.num_classes, "val_images": len(val),
            "train_transform": f"random resize of {train_scale(cfg.crop_size)} x 0.5-2.0, crop {cfg.crop_size} "
                               "(cat_max_ratio 0.75), flip, photometric distortion, ImageNet normalisation",
            "eval_transform": f"keep-ratio resize into {train_scale(cfg.crop_size)}, ImageNet normalisation"}
    if train is not None:
        info["train_images"] = len(train)
    return info


# -- model --------------------------------------------------------------------------------------
def build_seg_model(cfg: C.RunConfig, num_classes: int, class_names: Optional[List[str]] = None,
                    aux_blocks: Optional[Tuple[int, ...]] = None, channels: Optional[int] = None) -> SegmentationModel:
    """The prompted encoder of ``cfg`` (position embeddings at ``crop_size``) with SETR-PUP heads.

    The encoder's classification head is replaced by an identity: it would be an unused
    trainable tensor (DDP would need find_unused_parameters) and is not part of the tuned state;
    for the same reason the backbone's final norm stays frozen under ``method: full``.
    With ``weights: null`` the random backbone depends only on the torch seed in force.
    ``channels`` of the heads: SETR's 256 (``HEAD_CHANNELS``) unless given.
    """
    from ..model import build_model
    with warnings.catch_warnings():
        if cfg.weights is None:
            warnings.simplefilter("ignore")
        encoder = build_model(cfg.backbone, method=cfg.method, num_prompts=cfg.num_prompts,
                              num_classes=num_classes, gate_init=cfg.gate_init,
                              learn_temperature=cfg.learn_temperature, insert_at_block=cfg.insert_at_block,
                              weights=cfg.weights, image_size=cfg.crop_size, prompt_dropout=cfg.prompt_dropout,
                              pooling=cfg.pooling or None, class_names=class_names,
                              pos_embed_interpolation=SEG_POS_EMBED_INTERPOLATION)
    encoder.head = nn.Identity()
    encoder.backbone.norm.requires_grad_(False)  # the heads read tokens before the final norm (method full)
    encoder.grad_checkpointing = cfg.train.grad_checkpointing
    blocks = aux_blocks_for_depth(encoder.depth) if aux_blocks is None else tuple(aux_blocks)
    model = SegmentationModel(encoder, num_classes, aux_blocks=blocks, channels=channels or HEAD_CHANNELS)
    model.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return model


def seg_tuned_state(model: SegmentationModel) -> Dict[str, torch.Tensor]:
    """What training changes: the encoder's trainable tensors and every head tensor (BN statistics included)."""
    frozen = {f"encoder.{n}" for n, p in model.encoder.named_parameters() if not p.requires_grad}
    frozen |= {f"encoder.{n}" for n, _ in model.encoder.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in frozen}


def set_seg_tuned_state(model: SegmentationModel, state: Dict[str, torch.Tensor], source: str = "<state>") -> None:
    own = seg_tuned_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        from ..model.checkpoints import CheckpointError
        raise CheckpointError(f"{source} does not fit this segmentation model: missing {missing}, unexpected "
                              f"{unexpected}, mis-shaped {shapes}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def backbone_checksum(model: SegmentationModel) -> str:
    """SHA-256 of the frozen encoder tensors: tells whether a tuned file meets the backbone it was trained on."""
    h = hashlib.sha256()
    for name, p in sorted(model.encoder.named_parameters()):
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def seg_identity(cfg: C.RunConfig, model: SegmentationModel) -> Dict:
    enc = model.encoder
    return {"backbone": enc.backbone_name, "method": enc.method, "num_prompts": enc.num_prompts,
            "gate_init": enc.gate_init, "learn_temperature": enc.learn_temperature,
            "insert_at_block": enc.insert_at_block, "prompt_dropout": enc.prompt_dropout.p, "pooling": enc.pooling,
            "crop_size": cfg.crop_size, "num_classes": model.num_classes, "class_names": model.class_names,
            "aux_blocks": list(model.aux_blocks), "channels": model.decode_head.conv_seg.in_channels,
            "depth": enc.depth, "embed_dim": enc.embed_dim}


def save_seg_tuned(path, cfg: C.RunConfig, model: SegmentationModel, extra: Optional[Dict] = None) -> None:
    """safetensors with the tuned state and, as metadata, what is needed to rebuild the model."""
    from .. import __version__
    from ..model.tuned import write_safetensors
    tensors = {k: v.contiguous() for k, v in seg_tuned_state(model).items()}
    meta = {"format": TUNED_FORMAT, "gapt_version": __version__, "config": json.dumps(seg_identity(cfg, model)),
            "backbone_checksum": backbone_checksum(model), "weights": json.dumps(cfg.weights)}
    if extra:
        meta["extra"] = json.dumps(extra)
    write_safetensors(tensors, path, meta)


def read_seg_tuned(path) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(metadata with ``config`` decoded, tensors) of a segmentation tuned file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from ..model.checkpoints import CheckpointError
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"segmentation tuned file not found: {path}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path} is not a safetensors file: {str(e).splitlines()[0]}") from None
    if meta.get("format") != TUNED_FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is not a gapt segmentation tuned file (metadata format="
                              f"{meta.get('format')!r}); classification runs are read by `gapt eval`")
    meta["config"] = json.loads(meta["config"])
    meta["extra"] = json.loads(meta["extra"]) if "extra" in meta else {}
    return meta, load_file(str(p))


def config_from_identity(cfg: C.RunConfig, ident: Dict) -> C.RunConfig:
    return replace(cfg, backbone=ident["backbone"], method=ident["method"],
                   num_prompts=ident["num_prompts"] or cfg.num_prompts, gate_init=ident["gate_init"],
                   learn_temperature=ident["learn_temperature"], insert_at_block=ident["insert_at_block"],
                   prompt_dropout=ident["prompt_dropout"], pooling=ident["pooling"], crop_size=ident["crop_size"])


def load_seg_model(tuned_path, cfg: Optional[C.RunConfig] = None, weights: Optional[str] = "__file__"
                   ) -> Tuple[SegmentationModel, Dict]:
    """Rebuild a segmentation model from its tuned file (+ ``cfg`` for anything not stored) and load it.

    ``weights``: the backbone checkpoint; by default the one recorded in the file. A random
    backbone (``weights: null``) is rebuilt from ``cfg.train.seed`` exactly as training built it;
    a backbone whose checksum differs from the training one is reported with a warning.
    """
    meta, tensors = read_seg_tuned(tuned_path)
    ident = meta["config"]
    cfg = cfg or C.RunConfig()
    if weights == "__file__":
        weights = json.loads(meta.get("weights", "null"))
    cfg = replace(config_from_identity(cfg, ident), weights=weights)
    seed_everything(cfg.train.seed)
    model = build_seg_model(cfg, ident["num_classes"], ident["class_names"], aux_blocks=tuple(ident["aux_blocks"]),
                            channels=ident["channels"])
    set_seg_tuned_state(model, tensors, str(tuned_path))
    held = meta.get("backbone_checksum")
    if held and held != backbone_checksum(model):
        msg = (f"{tuned_path} was trained on a backbone whose weights differ from the ones loaded now "
               f"(weights={weights!r}); its predictions will not match the run's")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return model.eval(), meta


# -- schedule and optimizer ----------------------------------------------------------------------
def poly_lr(base_lr: float, iteration: int, total: int, power: float, min_lr: float) -> float:
    """MMSegmentation PolyLR: (base - min) * (1 - it / total) ** power + min."""
    progress = min(max(iteration / total, 0.0), 1.0)
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def make_seg_optimizer(cfg: C.RunConfig, model: SegmentationModel) -> torch.optim.Optimizer:
    t = cfg.train
    groups = model.param_groups(t.lr, t.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def apply_poly(optimizer: torch.optim.Optimizer, cfg: C.RunConfig, iteration: int) -> float:
    """Set every group's lr for ``iteration`` (0-based); returns the prompt (base) lr."""
    t = cfg.train
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], iteration, t.iterations, t.poly_power, t.min_lr)
    return poly_lr(t.lr, iteration, t.iterations, t.poly_power, t.min_lr)


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
def _truncate_metrics(folder: Path, iteration: int) -> None:
    kept = [r for r in rf.read_metrics(folder) if r.get("iteration", 0) <= iteration]
    rf.atomic_write_text(folder / rf.METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def _results(cfg: C.RunConfig, model: SegmentationModel, info: Dict, metrics: Dict, train_time: float,
             device, dtype) -> Dict:
    enc, t = model.encoder, cfg.train
    return {
        "backbone": cfg.backbone, "method": cfg.method, "learn_temperature": cfg.learn_temperature,
        "num_prompts": enc.num_prompts, "prompt_init": cfg.prompt_init, "gate_init": cfg.gate_init,
        "insert_at_block": cfg.insert_at_block, "benchmark": cfg.data.format, "task": seg_task_name(cfg),
        "seed": t.seed, "final": True, "metrics": metrics, "data": info,
        "tuned_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "encoder_tuned_params": enc.num_tuned(), "aux_blocks": list(model.aux_blocks), "crop_size": cfg.crop_size,
        "iterations": t.iterations, "batch_size": t.batch_size, "lr": t.lr, "head_lr_mult": t.head_lr_mult,
        "weight_decay": t.weight_decay, "train_time_s": train_time, "device": str(device),
        **precision_record(t.precision, device), "pos_embed_interpolation": enc.pos_embed_interpolation,
        "world_size": dist.world_size(),
    }


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
    check_model_config(cfg, size_key="crop_size")
    device = resolve_device(cfg)
    with dist.process_group(device.type), precision_scope(cfg.train.precision, device):  # fp32: TF32 off
        return _train_seg(cfg, device, resume, multi_scale, log_every, save_every, stop_after)


def _train_seg(cfg: C.RunConfig, device: torch.device, resume: bool, multi_scale: bool, log_every: Optional[int],
               save_every: Optional[int], stop_after: Optional[int]) -> Dict:
    from .evaluate import evaluate_seg, write_eval_file
    t = cfg.train
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = dist.world_size()
    if t.batch_size % world:
        raise C.ConfigError(f"bad value for config key 'train.batch_size': {t.batch_size} does not divide over "
                            f"{world} processes")
    out = Path(cfg.out)
    if dist.is_main():
        if not resume:
            rf.check_new_run(out, "gapt seg train")
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh start killed before its first resume file may have left lines
            rf.atomic_write_text(out / rf.METRICS, "")
            rf.atomic_write_text(out / rf.CONFIG, C.to_yaml(cfg))
    dtype = autocast_dtype(cfg, device)
    tracking.resolve_logger(t.logger)  # a missing package fails before any work

    train_set = seg_dataset(cfg, "train", SegTrainPipeline(cfg.crop_size, scale=train_scale(cfg.crop_size)), t.seed)
    val_set = seg_dataset(cfg, "val", eval_pipeline(cfg.crop_size), t.seed)
    info = data_info(cfg, train_set, val_set)
    seed_everything(t.seed)
    model = build_seg_model(cfg, train_set.num_classes, train_set.class_names).to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1:
        log.warning("SyncBatchNorm needs CUDA; the heads' BatchNorm statistics stay per process on %s", device)
    optimizer = make_seg_optimizer(cfg, model)

    per_rank = t.batch_size // world
    sampler = PassSampler(train_set, t.seed)
    steps_per_pass = len(sampler) // per_rank
    if steps_per_pass == 0:
        raise C.ConfigError(f"bad value for config key 'train.batch_size': {t.batch_size} is larger than the "
                            f"{len(train_set)} training images")
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        forward = torch.compile(forward)

    iteration, train_time = 0, 0.0
    pending = {"loss_sum": 0.0, "images": 0, "iters": 0, "time": 0.0}
    last_eval = None  # SegMetrics of the latest evaluation
    if resume:
        state = torch.load(out / rf.RESUME, map_location="cpu", weights_only=True)
        set_seg_tuned_state(model, state["tuned"], str(out / rf.RESUME))
        optimizer.load_state_dict(state["optimizer"])
        iteration, train_time = int(state["iteration"]), float(state["train_time_s"])
        pending = dict(state["pending"])
        log_every = log_every or int(state.get("log_every", LOG_EVERY))
        save_every = save_every or int(state.get("save_every", SAVE_EVERY))
        set_rng_state(state["rng"])
        if dist.is_main():
            _truncate_metrics(out, iteration)
        log.info("resuming %s at iteration %d/%d", out, iteration, t.iterations)

    log_every, save_every = log_every or LOG_EVERY, save_every or SAVE_EVERY
    if log_every < 1 or save_every < 1:
        raise ValueError(f"log_every and save_every must be >= 1, got {log_every} and {save_every}")
    tracker = tracking.open_tracker(t.logger, out, start_step=iteration, resume=resume, config=C.to_dict(cfg),
                                    config_text=C.to_yaml(cfg), enabled=dist.is_main())

    def save_resume() -> None:
        if dist.is_main():
            rf.atomic_torch_save({"iteration": iteration, "tuned": seg_tuned_state(model),
                                  "optimizer": optimizer.state_dict(), "rng": rng_state(), "pending": dict(pending),
                                  "train_time_s": train_time, "log_every": log_every, "save_every": save_every},
                                 out / rf.RESUME)

    def run_eval(desc: str, multi: bool = False):
        model.eval()
        _broadcast_buffers(model)
        return evaluate_seg(model, val_set, cfg.crop_size, device, dtype, cfg.data.num_workers,
                            multi_scale=multi, desc=desc)

    eval_every = t.eval_every
    bar = Progress(t.iterations - iteration, "seg train", enabled=dist.is_main(), log_every=log_every)
    while iteration < t.iterations:
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
            bad = not math.isfinite(value)
            if world > 1:  # every process stops at the same iteration, none waits in a collective
                bad = dist.all_sum([float(bad)], device)[0] > 0
            if bad:
                what = f"loss is {value}" if not math.isfinite(value) else "the loss is not finite in another process"
                raise TrainingDiverged(f"{what} at iteration {iteration}; stopped. " + (
                    f"The last saved state is kept in {out / rf.RESUME}" if (out / rf.RESUME).exists() else
                    "No state had been saved yet") + "; a lower train.lr may help")
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
            evaluate_now = iteration == t.iterations or (eval_every > 0 and iteration % eval_every == 0)
            if evaluate_now or iteration % log_every == 0:
                loss_sum, iters = dist.all_sum([pending["loss_sum"], pending["iters"]], device)
                record = {"iteration": iteration, "epoch": epoch + 1, "loss": loss_sum / max(iters, 1), "lr": lr,
                          "images_per_s": pending["images"] / max(pending["time"], 1e-9)}
                pending = {"loss_sum": 0.0, "images": 0, "iters": 0, "time": 0.0}
                if evaluate_now:
                    last_eval = run_eval(f"val @ {iteration}")
                    record.update(last_eval.as_dict())
                    model.train()
                if dist.is_main():
                    rf.append_metrics(out, record)
                    tracker.log_record(record, iteration, model.encoder)
                    log.info("iteration %d/%d loss %.4f lr %.3g%s", iteration, t.iterations, record["loss"], lr,
                             f" mIoU {_pct(last_eval.miou)}" if evaluate_now else "")
            if evaluate_now or iteration % save_every == 0 or iteration == stop_after:
                save_resume()
                dist.barrier()
            if iteration == stop_after and iteration < t.iterations:
                bar.close()
                tracker.close()
                return {"stopped_after": iteration}
            if iteration >= t.iterations:
                break
            tick = time.time()
    bar.close()

    if last_eval is None:  # resumed from the final state: evaluate it again
        last_eval = run_eval("val (final)")
    result_metrics = last_eval.as_dict()
    ms = run_eval("val multi-scale", multi=True) if multi_scale else None
    if ms is not None:
        result_metrics.update({f"{k}_ms": v for k, v in ms.as_dict().items()})
    results = _results(cfg, model, info, result_metrics, train_time, device, dtype)
    if dist.is_main():
        save_seg_tuned(out / rf.TUNED, cfg, model, extra={"data": info, "iteration": iteration})
        write_eval_file(out, "val", last_eval, ms, {"iteration": iteration})
        rf.write_json(out / rf.RESULTS, results)
        tracker.log_results(result_metrics, iteration)
        log.info("done: val mIoU %s%s -> %s", _pct(last_eval.miou),
                 f" (multi-scale {_pct(ms.miou)})" if ms is not None else "", out)
    tracker.close()
    dist.barrier()
    return results


def train_seg_multi_scale(cfg: C.RunConfig, resume: bool = False) -> Dict:
    """train_seg with the multi-scale + flip evaluation at the end (mIoU_ms): what `gapt reproduce`'s
    ADE20K runs call through the sweep executors (``gapt.seg.train:train_seg_multi_scale``)."""
    return train_seg(cfg, resume=resume, multi_scale=True)
