"""The work of a plan, for ``gapt reproduce --dry-run``: images processed, their FLOPs, an estimated time.

What is counted, per run (a spec's runs are its lr-search trials and its finals):

- classification: train images x epochs (forward + backward); val images x epochs (forward); test
  images x 2 (the best-val and the last state: an upper bound, one pass when the last epoch is the best)
  or x 1 when val is inside the training data (VTAB finals train on train800val200);
  ``train.eval_test_every_epoch=true`` adds test x epochs. Split sizes are read from the split files
  when the dataset is on disk, else taken from the sizes VPT publishes (:data:`FGVC_SIZES`,
  :data:`VTAB_SIZES`).
- ADE20K: iterations x batch crops (forward + backward); val images x sliding windows at every
  evaluation (every ``seg.eval_every`` iterations and at the end, single scale), then one multi-scale
  + flip pass (6 ratios x 2). Windows follow gapt.seg's own resize and window rules; the val images'
  sizes are read from the files when present, else every image is taken as 512 x 683 (a 4:3 image).
  Crops and windows are never added to classification images; iterations never to epochs.

FLOPs are matmul and convolution FLOPs, 2 per multiply-add (benchmarks/gpu.py counts the same way):
the frozen backbone with its prompts (forward; backward = input gradients only, frozen weights have
none, and none before the block the prompts enter), the classifier head, and for ADE20K the SETR-PUP
heads (their weights train: backward = 2 x forward). Softmax, norms, activations, data loading and the
optimizer are not counted, so a measured time per reference image already holds them.

A *reference image* is one training image of ViT-B/16 at 224 px, 100 prompts (gated), 100 classes:
:func:`reference_flops` FLOPs for its forward + backward, the cell ``benchmarks/gpu.py`` times as
``train_step`` gated+temperature. ``--time-per-image S`` (seconds per reference image) gives each cell
the time FLOPs / reference FLOPs x S. No torch at import.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# VPT's published split sizes (train, val, test), used when a dataset is not on disk.
FGVC_SIZES = {"cub": (5394, 600, 5794), "nabirds": (21536, 2393, 24633), "flowers": (1020, 1020, 6149),
              "dogs": (10800, 1200, 8580), "cars": (7329, 815, 8041)}
VTAB_LISTS = {"train800": 800, "val200": 200, "train800val200": 1000}
VTAB_SIZES = {"cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
              "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
              "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735,
              "kitti": 711, "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150,
              "smallnorb_ele": 12150}  # test images per task
ADE20K_VAL_IMAGES, ADE20K_ASSUMED_HW, ADE20K_CLASSES = 2000, (512, 683), 150
# methods whose FLOPs the formulas below count; for others (full fine-tuning, LoRA, adapters, Fourier or
# pruned prompts, ...) the dry run counts images but no FLOPs, and says so
COUNTED_METHODS = ("linear", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
SEG_HEAD_CHANNELS, SEG_AUX_HEADS = 256, 2


# -- FLOPs ----------------------------------------------------------------------------------------
def backbone_dims(name: str) -> Dict[str, int]:
    """depth, width, MLP width, patch size and prefix tokens (CLS + registers) of a registered backbone."""
    from ..model.backbones import resolve_spec
    a = resolve_spec(name).arch
    if not a.get("embed_dim") or not a.get("depth"):
        raise ValueError(f"{name}: its architecture is not registered, so its FLOPs are not counted")
    d = int(a["embed_dim"])
    prefix = (0 if a.get("class_token") is False else 1) + int(a.get("reg_tokens") or a.get("num_reg_tokens") or 0)
    return {"depth": int(a["depth"]), "dim": d, "hidden": int(d * float(a.get("mlp_ratio", 4.0))),
            "patch": int(a["patch_size"]), "prefix": prefix}


def block_flops(n: int, d: int, h: int, backward: bool = False) -> int:
    """One frozen transformer block, one image of ``n`` tokens, width ``d``, MLP width ``h``.
    Forward: qkv 2n d 3d, proj 2n d d, fc1 2n d h, fc2 2n h d, and Q K^T, P V 2n^2 d each.
    Backward to the input only (frozen weights): each linear layer's input gradient costs its forward;
    both factors of Q K^T and of P V are activations, so each product has two gradient products: 8 n^2 d."""
    return 2 * n * d * (4 * d + 2 * h) + (8 if backward else 4) * n * n * d


def vit_flops(dims: Dict[str, int], grid: Tuple[int, int], prompts: int, method: str = "gated",
              insert_at_block: int = 1, classes: int = 0, train: bool = True) -> int:
    """Forward (+ backward when ``train``) FLOPs of one image through a prompted frozen ViT and a linear head of
    ``classes``: patch embedding, blocks (the prompts join at block 1, or ``insert_at_block`` for vpt-at-block;
    vpt-deep's per-block prompts count as ``prompts`` in every block), head; backward: head weights and input,
    then the blocks from the prompts' entry on (none without prompts)."""
    if method not in COUNTED_METHODS:
        raise ValueError(f"method {method}: its FLOPs are not counted (the formulas cover {', '.join(COUNTED_METHODS)})")
    prompts = 0 if method == "linear" else int(prompts)
    d, h, depth = dims["dim"], dims["hidden"], dims["depth"]
    patches = grid[0] * grid[1]
    n0 = dims["prefix"] + patches
    entry = depth + 1 if not prompts else (insert_at_block if method == "vpt-at-block" else 1)
    tokens = [n0 if b < entry else n0 + prompts for b in range(1, depth + 1)]
    total = 2 * patches * 3 * dims["patch"] ** 2 * d + sum(block_flops(t, d, h) for t in tokens) + 2 * d * classes
    if train:
        total += 2 * d * classes
        if prompts:
            total += 2 * d * classes + sum(block_flops(t, d, h, True) for b, t in enumerate(tokens, 1) if b >= entry)
    return total


def pup_head_flops(d: int, grid: Tuple[int, int], classes: int = ADE20K_CLASSES, channels: int = SEG_HEAD_CHANNELS,
                   convs: int = 4, up: int = 2) -> int:
    """Forward FLOPs of one SETR-PUP head (gapt.seg.head.SETRPUPHead) on a (d, gh, gw) map: ``convs`` 3x3
    convolutions, each followed by an upsampling x``up``, then the 1x1 classifier at the final size."""
    (gh, gw), cin, total = grid, d, 0
    for _ in range(convs):
        total += 2 * 9 * cin * channels * gh * gw
        cin, gh, gw = channels, gh * up, gw * up
    return total + 2 * channels * classes * gh * gw


def reference_flops() -> int:
    """One reference image (module doc): ViT-B/16, 224 px, 100 prompts, gated, 100 classes, forward + backward."""
    return vit_flops(backbone_dims("mae_vitb16"), (14, 14), 100, "gated", classes=100)


# -- per spec -----------------------------------------------------------------------------------
def _count_split(folder: Path, benchmark: str, stem: str) -> Optional[int]:
    try:
        if benchmark == "fgvc":
            return len(json.loads((folder / f"{stem}.json").read_text()))
        return sum(1 for line in (folder / f"{stem}.txt").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return None


def split_sizes(benchmark: str, task: str, cfg, folder: Path) -> Tuple[Dict[str, int], str]:
    """Images in the splits a trial and a final run read: {train, val, test, final_train}, and where from."""
    d = cfg.data
    if benchmark == "fgvc":
        stems = {"train": d.train_split or "train", "val": d.val_split or "val", "test": d.test_split or "test"}
        stems["final_train"] = stems["train"]  # the reference's final FGVC runs train on train.json alone
        published = dict(zip(("train", "val", "test"), FGVC_SIZES.get(task, (None,) * 3)))
        published["final_train"] = published["train"]
    else:
        stems = {"train": d.train_split or "train800", "val": d.val_split or "val200", "test": d.test_split or "test",
                 "final_train": d.train_split or "train800val200"}
        published = {k: VTAB_LISTS.get(v, VTAB_SIZES.get(task) if k == "test" else None) for k, v in stems.items()}
    counted = {k: _count_split(folder, benchmark, v) for k, v in stems.items()}
    if all(v is not None for v in counted.values()):
        return counted, "sizes from the split files"
    if any(v is None for v in published.values()):
        raise ValueError(f"{benchmark} {task}: split sizes unknown (no split files under {folder})")
    return published, "VPT's published split sizes: dataset not found"


def _classify_run(cfg, n_train: int, n_val: int, n_test: int, val_held_out: bool) -> Dict[str, int]:
    t = cfg.train
    per_epoch = min(n_train, t.max_steps_per_epoch * t.batch_size) if t.max_steps_per_epoch else n_train
    tests = (2 if val_held_out else 1) + (t.epochs if t.eval_test_every_epoch else 0)
    return {"train": per_epoch * t.epochs, "eval": n_val * t.epochs + n_test * tests}


_SIZES: Dict[str, Tuple[List[Tuple[int, int]], str]] = {}


def _seg_image_sizes(folder: Path) -> Tuple[List[Tuple[int, int]], str]:
    if str(folder) not in _SIZES:
        _SIZES[str(folder)] = _read_seg_sizes(folder)
    return _SIZES[str(folder)]


def _read_seg_sizes(folder: Path) -> Tuple[List[Tuple[int, int]], str]:
    files = sorted((folder / "images" / "validation").glob("*.jpg")) if folder.is_dir() else []
    if files:
        from PIL import Image
        sizes = []
        for f in files:
            with Image.open(f) as im:
                sizes.append((im.height, im.width))
        return sizes, "val image sizes from the files"
    return [ADE20K_ASSUMED_HW] * ADE20K_VAL_IMAGES, "assumed: 2000 val images of 512x683, dataset not found"


def _windows(h: int, w: int, crop: int, ratio: float) -> List[Tuple[int, int]]:
    from ..seg.inference import slide_windows
    from ..seg.recipe import slide_stride, train_scale
    from ..seg.transforms import scaled_size
    sh, sw = scaled_size(h, w, ratio, train_scale(crop))
    return [(y2 - y1, x2 - x1) for y1, y2, x1, x2 in slide_windows(sh, sw, crop, slide_stride(crop))]


def seg_crop_flops(cfg, dims: Dict[str, int]) -> int:
    """One ADE20K training crop: the prompted backbone forward + backward to the prompts, the main head and the
    auxiliary heads forward and backward (their weights train: 2 x forward)."""
    d, grid = dims["dim"], (cfg.seg.crop_size // dims["patch"],) * 2
    heads = pup_head_flops(d, grid) + SEG_AUX_HEADS * pup_head_flops(d, grid, convs=2, up=4)
    return vit_flops(dims, grid, cfg.num_prompts, cfg.method, cfg.insert_at_block) + 3 * heads


def seg_window_flops(cfg, dims: Dict[str, int], hw: Tuple[int, int]) -> int:
    """One evaluation window of ``hw`` pixels (padded to whole patches, MMSegmentation's corner padding): the
    backbone forward and the main head."""
    grid = (math.ceil(hw[0] / dims["patch"]), math.ceil(hw[1] / dims["patch"]))
    return vit_flops(dims, grid, cfg.num_prompts, cfg.method, cfg.insert_at_block, train=False) \
        + pup_head_flops(dims["dim"], grid)


def _seg_run(cfg, dims: Dict[str, int], sizes: List[Tuple[int, int]]) -> Dict[str, int]:
    """One ADE20K run: crops trained, windows evaluated, FLOPs (module doc)."""
    from ..seg.transforms import MS_RATIOS
    sg = cfg.seg
    counted = cfg.method in COUNTED_METHODS
    step = seg_crop_flops(cfg, dims) if counted else 0
    evals = sg.iterations // sg.eval_every + bool(sg.iterations % sg.eval_every) if sg.eval_every else 1
    cost: Dict[Tuple[int, int], int] = {}

    def window(hw):
        if hw not in cost:
            cost[hw] = seg_window_flops(cfg, dims, hw) if counted else 0
        return cost[hw]
    single = [w for h, wd in sizes for w in _windows(h, wd, sg.crop_size, 1.0)]
    multi = [w for h, wd in sizes for r in MS_RATIOS for w in _windows(h, wd, sg.crop_size, r)] * 2  # + flip
    crops = sg.iterations * cfg.train.batch_size
    flops = crops * step + evals * sum(window(w) for w in single) + sum(window(w) for w in multi)
    return {"train": crops, "eval": evals * len(single) + len(multi), "flops": flops if counted else None}


def spec_work(spec, cfg, trials: Sequence[Any], seeds: int, folder: Path) -> Dict[str, Any]:
    """A spec's work: its runs' images processed (classification: 224-px images; ADE20K: 512-px crops trained
    and sliding windows evaluated) and FLOPs; ``error`` says why a number could not be counted."""
    try:
        dims = backbone_dims(cfg.backbone)
        if spec.benchmark == "ade20k":
            sizes, source = _seg_image_sizes(folder)
            one = _seg_run(cfg, dims, sizes)
            runs = [one] * (len(trials) + seeds)
            unit = ("crops", "windows")
        else:
            n, source = split_sizes(spec.benchmark, spec.task, cfg, folder)
            grid = (cfg.image_size // dims["patch"],) * 2
            classes = cfg.data.num_classes or 100  # the head is < 0.01 % of a step's FLOPs
            runs = []
            for c, final in [(c, False) for c in trials] + [(cfg, True)] * seeds:
                held_out = not (final and spec.benchmark == "vtab")
                r = _classify_run(c, n["final_train"] if final else n["train"], n["val"], n["test"], held_out)
                r["flops"] = None
                if c.method in COUNTED_METHODS:
                    r["flops"] = (r["train"] * vit_flops(dims, grid, c.num_prompts, c.method, c.insert_at_block,
                                                         classes)
                                  + r["eval"] * vit_flops(dims, grid, c.num_prompts, c.method, c.insert_at_block,
                                                          classes, train=False))
                runs.append(r)
            unit = ("images", "images")
    except (ValueError, ImportError) as e:
        return {"error": str(e)}
    out = {"unit_train": unit[0], "unit_eval": unit[1], "train": sum(r["train"] for r in runs),
           "eval": sum(r["eval"] for r in runs), "sizes_from": source, "flops": None, "reference_images": None}
    if all(r["flops"] is not None for r in runs):
        out["flops"] = sum(r["flops"] for r in runs)
        out["reference_images"] = out["flops"] / reference_flops()
    else:
        out["flops_note"] = f"FLOPs not counted for method {cfg.method} (the formulas cover {', '.join(COUNTED_METHODS)})"
    return out


# -- totals, time, text -------------------------------------------------------------------------
def add_totals(info: Dict[str, Any]) -> Dict[str, Any]:
    """Totals of the specs' work, one per unit (images, crops, windows are never added together)."""
    work = [s["work"] for s in info["specs"]]
    totals: Dict[str, int] = {}
    for w in work:
        if "error" not in w:
            for key in ("train", "eval"):
                name = f"{key}_{w['unit_' + key]}"
                totals[name] = totals.get(name, 0) + w[key]
    info["work"] = totals
    info["flops"] = sum(w.get("flops") or 0 for w in work)
    info["reference_images"] = info["flops"] / reference_flops()
    info["uncounted"] = [s["name"] for s in info["specs"] if "error" in s["work"]]  # no images counted
    info["flops_uncounted"] = [s["name"] for s in info["specs"] if s["work"].get("flops") is None]
    return info


def add_time(info: Dict[str, Any], time_per_image: Optional[float]) -> Dict[str, Any]:
    """With ``time_per_image`` (seconds per reference image): ``time_s`` per spec / job row and in all."""
    if time_per_image is None:
        return info
    if not time_per_image > 0:
        raise ValueError(f"--time-per-image must be > 0 seconds, got {time_per_image}")
    ref = reference_flops()
    info["time_per_image"] = time_per_image
    for row in info.get("specs", []) + info.get("jobs", []):
        flops = row.get("work", row).get("flops")
        if flops is not None:
            row["time_s"] = flops / ref * time_per_image
    info["time_s"] = info["flops"] / ref * time_per_image
    return info


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_dry_run(info: Dict[str, Any]) -> str:
    """The dry run as text: the inputs and whether they are there, then a line per cell, then the totals."""
    lines = ["inputs:"]
    for d in info.get("datasets", []):
        lines.append(f"  dataset {d['benchmark']} {d['task']}: {d['folder']} "
                     f"({'present' if d['present'] else 'MISSING'})")
    for w in info.get("weights", []):
        if w["file"]:
            lines.append(f"  weights {w['backbone']}: {w['file']} ({'present' if w['present'] else 'MISSING'})")
        else:
            lines.append(f"  weights {w['backbone']}: not given (--weights {w['backbone']}=FILE"
                         + (f"; the file: {w['download']}" if w.get("download") else "") + ")")
    t = info.get("time_per_image")
    time_of = (lambda r: f", ~{duration(r['time_s'])}" if "time_s" in r else "")
    if info.get("kind") == "dip":
        lines.append(f"images: {len(info['images']) or info['jobs'][0]['images']} ({info['images_from']})")
        for j in info["jobs"]:
            lines.append(f"  {j['backbone']:16s} {j['images']} image(s) x {j['blocks']} blocks = {j['jobs']} DIP "
                         f"job(s) x {j['steps']} steps, {j['flops']:.3g} FLOPs{time_of(j)}"
                         + (f"  ({j['jobs_done']} done)" if j["jobs_done"] else ""))
        lines.append(f"{info['plan']}: {info['runs']} DIP job(s), {info['dip_steps']} steps in all, under {info['out']}")
    else:
        for s in info["specs"]:
            unit = "iterations" if "iterations" in s else "epochs"
            lines.append(f"  {s['name']:40s} {s['runs']:3d} run(s) x {s[unit]} {unit}  {s['what']}  [{s['settings']}]"
                         + (f"  ({s['finals_done']} final(s) done)" if s["finals_done"] else ""))
            w = s["work"]
            if "error" in w:
                lines.append(f"      work: not counted ({w['error']})")
            else:
                flops = f"{w['flops']:.3g} FLOPs{time_of(s)}" if w["flops"] is not None else w["flops_note"]
                lines.append(f"      work: {w['train']:,} {w['unit_train']} trained + {w['eval']:,} {w['unit_eval']} "
                             f"evaluated, {flops}; {w['sizes_from']}")
        counts = [f"{info['epochs']} epochs" if info["epochs"] or not info["iterations"] else "",
                  f"{info['iterations']} ADE20K iterations" if info["iterations"] else ""]
        lines.append(f"{info['plan']}: {len(info['specs'])} cell(s), {info['runs']} run(s), "
                     f"{' and '.join(c for c in counts if c)}, under {info['out']}")
        work = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in info["work"].items()
                         if k.startswith("train")) + "; " + \
            ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in info["work"].items() if k.startswith("eval"))
        lines.append(f"work: {work}" + (f" (not counted: {', '.join(info['uncounted'])})" if info["uncounted"] else ""))
    missing = info.get("flops_uncounted") or []
    lines.append(f"FLOPs: {info['flops']:.3g} = {info['reference_images']:,.0f} reference images (ViT-B/16 224 px, "
                 f"100 prompts, forward + backward = {reference_flops():.3g} FLOPs)"
                 + (f"; {len(missing)} cell(s) not counted, so these are a lower bound" if missing else ""))
    if t:
        lines.append(f"estimated time at {t:g} s per reference image: {duration(info['time_s'])} on one device "
                     f"(an estimate from FLOPs, not a measurement{'; cells without FLOPs left out' if missing else ''})")
    else:
        lines.append("add --time-per-image SECONDS (per reference image) for an estimated time")
    return "\n".join(lines)
