"""``gapt analyze reconstruct``: Deep Image Prior reconstructions from each block's tokens (Figs. 2, 9, 10, 11).

SPEC §10 (gapt's documented choices; the paper names only the method): the target is the
tokens leaving block l (CLS and patches, no prompts) of the frozen backbone on the original
image x0 (resized on its short side and centre-cropped to ``image_size``, the ImageNet
normalisation every gapt backbone uses). A DIP "skip" generator f_theta (5 scales, 128
channels, 4-channel skips, BatchNorm + LeakyReLU 0.2, bilinear upsampling, sigmoid output) is fed
a fixed noise z (32 channels, uniform in [0, 0.1]) plus fresh noise of std 1/30 each step and
trained with Adam (lr 0.01) to minimise the mean squared error between the block-l tokens of
normalise(f_theta(z)) and of x0. The scored image is f_theta(z) drawn as DIP's own code draws it: the
generator in training mode (BatchNorm on the image's own statistics), the fixed z without noise.
Scores: PSNR (data range 1) and SSIM (Gaussian window 11, sigma 1.5), from torchmetrics, of the saved
8-bit reconstruction against the saved 8-bit x0.

Every image x block x backbone is one job folder (``job.json``, ``state.pt`` every
``save_every`` steps, then ``recon.png`` and ``results.json``) submitted to the sweep executors
(inline, worker processes, or Ray): finished jobs are skipped, interrupted ones resume from their
last state (same noise stream, so a resumed job ends where an uninterrupted one would).
The driver then writes ``reconstruct.json`` / ``reconstruct.md`` (PSNR and SSIM per image, block and
backbone, and the means per block), ``reconstruct_metrics.png`` (mean PSNR and SSIM per block, one
line per backbone: Fig. 9) and per image ``grid_<image>.png`` (a row for the original, then one per
backbone; a column per block: Figs. 2, 10, 11). ``gapt reproduce fig2 | fig9 | fig10 | fig11`` plan
these jobs on the paper's backbones and images (:func:`plan_fig2`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .dip import DEFAULTS, JOB_FILE, ORIGINAL_PNG, RECON_PNG, STATE_FILE, TARGET
from .plotting import new_figure, save_png, write_text

log = logging.getLogger("gapt")

PathLike = Union[str, Path]


def _image_id(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:6]
    return f"{path.resolve().parent.name}-{path.stem}-{digest}"

def reconstruct_jobs(images: Sequence[PathLike], backbones: Sequence[Dict[str, Any]], blocks: Optional[Sequence[int]],
                     out: PathLike, **options) -> List[Any]:
    """One job per image x backbone x block in ``out/jobs/<backbone>/<image id>/block_<l>`` (job.json written).

    ``backbones``: ``[{"backbone", "weights", "label"}, ...]``; ``blocks`` 1-based (default: every block of each
    backbone); ``options``: the SPEC §10 settings in :data:`DEFAULTS` plus ``device``. A folder whose job.json
    holds other settings is an error naming them (choose another --out)."""
    from ..sweep.jobs import Job
    from .insertion import backbone_depth
    unknown = sorted(set(options) - set(DEFAULTS) - {"device", "backbone_seed"})
    if unknown:
        raise ValueError(f"unknown reconstruction option(s): {', '.join(unknown)}")
    out = Path(out)
    jobs = []
    labels = [b.get("label") or b["backbone"] for b in backbones]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two --backbone entries share the label {labels}; give each a distinct backbone or label")
    for b, label in zip(backbones, labels):
        depth = backbone_depth(SimpleNamespace(backbone=b["backbone"], image_size=options.get("image_size", 224)))
        bl = list(blocks) if blocks else list(range(1, depth + 1))
        bad = [k for k in bl if not 1 <= k <= depth]
        if bad:
            raise ValueError(f"--blocks {bad}: the backbone {b['backbone']} has blocks 1..{depth}")
        for image in images:
            image = Path(image)
            for k in bl:
                folder = out / "jobs" / label / _image_id(image) / f"block_{k}"
                spec = {**{key: options.get(key, v) for key, v in DEFAULTS.items()}, "image": str(image.resolve()),
                        "backbone": b["backbone"], "weights": _weights(b.get("weights")), "label": label, "block": k,
                        "device": options.get("device"), "backbone_seed": options.get("backbone_seed")}
                _check_job(folder, spec)
                jobs.append(_job(Job, folder, spec, f"{label}-{_image_id(image)}-block_{k}"))
    return jobs

def _weights(w: Optional[str]) -> Optional[str]:
    """A weights path made absolute (jobs may run elsewhere); "null"/"none" for a random backbone."""
    if w is None or str(w).lower() in ("null", "none"):
        return None
    if not Path(w).is_file():
        raise FileNotFoundError(f"--weights {w}: file not found")
    return str(Path(w).resolve())

def _job(Job, folder: Path, spec: Dict[str, Any], name: str):
    job = Job(kind="recon", name=name, folder=folder, overrides={}, target=TARGET)
    job.spec = spec  # written to job.json by prepare_jobs
    return job

# settings that may change between a killed run and its restart without changing a job's result
_FREE = ("device", "log_every", "save_every")

def _check_job(folder: Path, spec: Dict[str, Any]) -> None:
    path = folder / JOB_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diffs = [f"{k}: {old.get(k)!r} there vs {v!r} here" for k, v in spec.items() if k not in _FREE and old.get(k) != v]
    if diffs:
        raise ValueError(f"{folder} holds a reconstruction with other settings ({'; '.join(diffs[:4])}); "
                         f"choose another --out or delete that folder")

def prepare_jobs(jobs) -> None:
    from ..engine import runfolder as rf
    for job in jobs:
        job.folder.mkdir(parents=True, exist_ok=True)
        rf.atomic_write_text(job.folder / JOB_FILE, json.dumps(job.spec, indent=2) + "\n")
        job.resume = (job.folder / STATE_FILE).exists()

def reconstruct(images: Sequence[PathLike], backbones: Sequence[Dict[str, Any]], blocks: Optional[Sequence[int]] = None,
                out: PathLike = "reconstruct", executor=None, **options) -> Dict[str, Any]:
    """Plan, run (through ``executor``; default inline) and summarise the reconstructions; see the module doc."""
    from ..engine import runfolder as rf
    from ..engine.inference import expand_images
    from ..sweep.executors import InlineExecutor

    images = expand_images([str(i) for i in images])
    if not backbones:
        raise ValueError("give at least one --backbone")
    jobs = reconstruct_jobs(images, backbones, blocks, out, **options)
    todo = [j for j in jobs if not (j.folder / rf.RESULTS).exists()]
    log.info("reconstruct: %d job(s) (%d image(s) x blocks x %d backbone(s)), %d already done",
             len(jobs), len(images), len(backbones), len(jobs) - len(todo))
    prepare_jobs(todo)
    errors = _run_target_jobs(todo, executor or InlineExecutor()) if todo else {}
    return summarise(jobs, out, errors)

def _run_target_jobs(jobs, executor) -> Dict[str, Optional[str]]:
    total, done, outcome = len(jobs), [0], {}
    for i, job in enumerate(jobs, 1):
        job.index, job.total = i, total

    def start(job) -> None:
        job.started = time.time()
        log.info("reconstruct [%d/%d] %s %s", job.index, total, "resuming" if job.resume else "starting", job.name)

    def end(job, status: str, error: Optional[str]) -> None:
        done[0] += 1
        outcome[job.name] = None if status == "done" else (error or status)
        log.info("reconstruct %d/%d finished: %s %s (%.0f s)%s", done[0], total, job.name, status,
                 time.time() - (job.started or time.time()), f": {error}" if error else "")
    executor.run(jobs, start, end)
    return outcome

def summarise(jobs, out: PathLike, errors: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, Any]:
    """reconstruct.json / .md, the Fig. 9 line plot and one grid per image, from the job folders."""
    from ..engine import runfolder as rf
    out = Path(out)
    rows, missing = [], []
    for job in jobs:
        if (job.folder / rf.RESULTS).exists():
            r = rf.read_json(job.folder / rf.RESULTS)
            rows.append({k: r[k] for k in ("image", "backbone", "label", "block", "psnr", "ssim", "loss_first",
                                           "loss_last", "steps")} | {"folder": str(job.folder)})
        else:
            missing.append({"job": job.name, "folder": str(job.folder), "error": (errors or {}).get(job.name)})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    means = []
    for label in labels:
        for block in sorted({r["block"] for r in rows if r["label"] == label}):
            sel = [r for r in rows if r["label"] == label and r["block"] == block]
            means.append({"label": label, "block": block, "n": len(sel),
                          "psnr": float(np.mean([r["psnr"] for r in sel])),
                          "ssim": float(np.mean([r["ssim"] for r in sel]))})
    summary = {"rows": rows, "means": means, "failed": missing}
    write_text(out / "reconstruct.json", json.dumps(summary, indent=2) + "\n")
    write_text(out / "reconstruct.md", reconstruct_table(rows, means, missing))
    pngs = {}
    if means:
        pngs["metrics"] = str(plot_metrics(means, out / "reconstruct_metrics.png"))
        for image in dict.fromkeys(r["image"] for r in rows):
            pngs[image] = str(plot_grid([r for r in rows if r["image"] == image], out / f"grid_{_image_id(Path(image))}.png"))
    summary["png"] = pngs
    if missing:
        log.warning("reconstruct: %d job(s) did not finish: %s", len(missing),
                    "; ".join(f"{m['job']}: {m['error']}" for m in missing[:5]))
    return summary

def reconstruct_table(rows, means, missing=()) -> str:
    lines = ["| backbone | block | images | mean PSNR (dB) | mean SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {m['label']} | {m['block']} | {m['n']} | {m['psnr']:.2f} | {m['ssim']:.4f} |" for m in means]
    lines += ["", "| image | backbone | block | PSNR (dB) | SSIM | loss first -> last |", "|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['image']).name} | {r['label']} | {r['block']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['loss_first']:.4g} -> {r['loss_last']:.4g} |" for r in rows]
    if missing:
        lines += ["", "Not finished: " + ", ".join(m["job"] for m in missing)]
    return "\n".join(lines) + "\n"

def plot_metrics(means: Sequence[Dict[str, Any]], out_png: PathLike) -> Path:
    """Fig. 9: mean PSNR and mean SSIM per block, one line per backbone."""
    fig = new_figure(9.0, 3.4)
    axes = fig.subplots(1, 2)
    for label in dict.fromkeys(m["label"] for m in means):
        sel = [m for m in means if m["label"] == label]
        n = max(m["n"] for m in sel)
        for ax, key in zip(axes, ("psnr", "ssim")):
            ax.plot([m["block"] for m in sel], [m[key] for m in sel], "o-", label=f"{label} (n={n})")
    blocks = sorted({m["block"] for m in means})
    for ax, name in zip(axes, ("mean PSNR (dB)", "mean SSIM")):
        ax.set_xlabel("block l (tokens reconstructed)")
        ax.set_ylabel(name)
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Deep Image Prior reconstruction from block-l tokens", fontsize=9)
    return save_png(fig, out_png)

def plot_grid(rows: Sequence[Dict[str, Any]], out_png: PathLike) -> Path:
    """Figs. 2, 10, 11: a row for the original, then one per backbone; a column per block."""
    from PIL import Image
    labels = list(dict.fromkeys(r["label"] for r in rows))
    blocks = sorted({r["block"] for r in rows})
    fig = new_figure(1.3 * len(blocks) + 1.0, 1.4 * (len(labels) + 1) + 0.5)
    axes = fig.subplots(len(labels) + 1, len(blocks), squeeze=False)
    original = np.asarray(Image.open(Path(rows[0]["folder"]) / ORIGINAL_PNG).convert("RGB"))
    for c, b in enumerate(blocks):
        axes[0, c].imshow(original)
        axes[0, c].set_title(f"block {b}", fontsize=8)
        for r, label in enumerate(labels, 1):
            hit = [x for x in rows if x["label"] == label and x["block"] == b]
            ax = axes[r, c]
            if hit:
                ax.imshow(np.asarray(Image.open(Path(hit[0]["folder"]) / RECON_PNG).convert("RGB")))
                ax.set_xlabel(f"{hit[0]['psnr']:.1f} dB / {hit[0]['ssim']:.2f}", fontsize=6, labelpad=1)
            else:
                ax.text(0.5, 0.5, "—", ha="center", va="center", transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0, 0].set_ylabel("original", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{Path(rows[0]['image']).name}: DIP reconstruction from each block (PSNR / SSIM)", fontsize=9)
    return save_png(fig, out_png)

# -- `gapt reproduce fig2` / `fig9` / `fig10` / `fig11` ----------------------------------------------
FIG_BACKBONES = ("sup_vitb16", "mocov3_vitb16", "mae_vitb16")  # the paper's row order
# SPEC §8: Figs. 2, 10, 11 are DIP grids of CUB and Flowers images, Fig. 9 the PSNR / SSIM of 100. Which
# images the paper drew is not said; gapt's rule, the same for every figure: the dataset folder's images
# (every image file under it) sorted by path, then a fixed slice of that list.
#   name: (title, [(task, first, count)] or None for fig9's evenly spread 100 CUB images)
FIG_IMAGES = {
    "fig2": ("Fig. 2: DIP reconstruction from each block", [("cub", 0, 2), ("flowers", 0, 2)]),
    "fig9": ("Fig. 9: PSNR and SSIM of 100 DIP reconstructions per block", None),
    "fig10": ("Fig. 10: DIP reconstruction from each block, more CUB images", [("cub", 2, 4)]),
    "fig11": ("Fig. 11: DIP reconstruction from each block, more Flowers images", [("flowers", 2, 4)]),
}
FIG9_IMAGES = 100

def plan_fig2(name: str = "fig2"):
    """No training: DIP reconstructions from every block of the supervised, MoCo v3 and MAE ViT-B/16 (rows in
    that order). Images (sorted by path): fig2 the first 2 of CUB and of Flowers; fig10 the next 4 of CUB
    (3rd to 6th), fig11 the next 4 of Flowers; fig9 100 CUB images spread evenly over the sorted list, for the
    mean PSNR / SSIM per block. Run by :func:`execute_reconstruct`; ``--dry-run`` by :func:`dry_run_reconstruct`."""
    from ..paper.plans import Plan
    plan = Plan(name, FIG_IMAGES[name][0], [], render=render_reconstruct,
                notes=["SPEC §10's DIP settings (2000 Adam steps per image and block)"])
    plan.execute = execute_reconstruct
    plan.dry_run = dry_run_reconstruct
    plan.backbones = list(FIG_BACKBONES)  # --weights BACKBONE=FILE for each (--backbone keeps one row)
    return plan

def plan_fig9():
    return plan_fig2("fig9")

def plan_fig10():
    return plan_fig2("fig10")

def plan_fig11():
    return plan_fig2("fig11")

def _dataset_images(data_root: PathLike, task: str) -> List[Path]:
    from ..data import IMAGE_EXTENSIONS
    from ..paper.plans import FGVC_FOLDERS
    folder = Path(data_root) / FGVC_FOLDERS[task]
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f"no images under {folder} ({task})")
    return found

def plan_images(name: str, data_root: PathLike) -> List[Path]:
    """The images of fig2 / fig9 / fig10 / fig11 under ``data_root`` (see :data:`FIG_IMAGES`)."""
    slices = FIG_IMAGES[name][1]
    if slices is None:
        cub = _dataset_images(data_root, "cub")
        n = min(FIG9_IMAGES, len(cub))
        return [cub[round(i * (len(cub) - 1) / max(1, n - 1))] for i in range(n)]
    out = []
    for task, first, count in slices:
        found = _dataset_images(data_root, task)
        if len(found) < first + count:
            raise FileNotFoundError(f"{name} needs images {first + 1}..{first + count} (sorted) of {task}; "
                                    f"{len(found)} found")
        out += found[first:first + count]
    return out

def execute_reconstruct(plan, out, data_root, weights: Dict[str, str], executor=None, **options) -> Dict[str, Any]:
    """Run a DIP figure: every image x block x backbone through ``executor``; returns the summary."""
    rows = list(getattr(plan, "backbones", FIG_BACKBONES))
    missing = [b for b in rows if b not in weights]
    if missing:
        raise FileNotFoundError(f"{plan.name} needs --weights BACKBONE=FILE for {', '.join(missing)}")
    backbones = [{"backbone": b, "weights": weights[b]} for b in rows]
    return reconstruct(plan_images(plan.name, data_root), backbones, None, out, executor=executor, **options)

def generator_flops(size: int, input_channels: int, channels: int, skip: int, scales: int,
                    backward: bool = False) -> int:
    """FLOPs (2 per multiply-add, convolutions only) of :class:`~gapt.analysis.dip.SkipGenerator` on one
    ``size`` x ``size`` input. Forward: level i at side R: skip 1x1 (cin -> skip) at R, down 3x3 stride 2
    (cin -> C) and 3x3 (C -> C) at ceil(R/2), merge 3x3 (skip + C -> C) and 1x1 (C -> C) at R; the 1x1 head
    (C -> 3) at the input side. ``backward``: every weight gradient (one forward's worth) and every input
    gradient but those of the two convolutions reading the noise input, which needs none."""
    total, cin, side = 2 * channels * 3 * size * size, input_channels, size
    first = 0
    for level in range(scales):
        half = (side + 1) // 2
        reads_input = 2 * side * side * cin * skip + 2 * half * half * 9 * cin * channels
        total += reads_input + 2 * side * side * (9 * (skip + channels) * channels + channels * channels)
        total += 2 * half * half * 9 * channels * channels
        first = reads_input if level == 0 else first
        cin, side = channels, half
    return 2 * total - first if backward else total

def dip_step_flops(backbone: str, block: int, options: Optional[Dict[str, Any]] = None) -> int:
    """FLOPs of one DIP step: the generator forward and backward (its weights train), then the frozen
    backbone's patch embedding and blocks 1..l forward and back to the image (input gradients only; the
    formulas of :mod:`gapt.paper.workload`)."""
    from ..paper.workload import backbone_dims, block_flops
    o = {**DEFAULTS, **(options or {})}
    d = backbone_dims(backbone)
    size = int(o["image_size"])
    patches = (size // d["patch"]) ** 2
    n, embed = d["prefix"] + patches, 2 * patches * 3 * d["patch"] ** 2 * d["dim"]
    vit = 2 * embed + block * (block_flops(n, d["dim"], d["hidden"]) + block_flops(n, d["dim"], d["hidden"], True))
    gen = [int(o[k]) for k in ("input_channels", "channels", "skip_channels", "scales")]
    return generator_flops(size, *gen) + generator_flops(size, *gen, backward=True) + vit

def dip_job_flops(backbone: str, block: int, options: Optional[Dict[str, Any]] = None) -> int:
    """FLOPs of one DIP job: ``steps`` steps, the target's forward and the final render."""
    from ..paper.workload import backbone_dims, block_flops
    o = {**DEFAULTS, **(options or {})}
    d = backbone_dims(backbone)
    size = int(o["image_size"])
    patches = (size // d["patch"]) ** 2
    target = 2 * patches * 3 * d["patch"] ** 2 * d["dim"] + block * block_flops(d["prefix"] + patches, d["dim"],
                                                                               d["hidden"])
    render = generator_flops(size, *[int(o[k]) for k in ("input_channels", "channels", "skip_channels", "scales")])
    return int(o["steps"]) * dip_step_flops(backbone, block, o) + target + render

def dry_run_reconstruct(plan, out: PathLike, data_root: PathLike, weights: Dict[str, str]) -> Dict[str, Any]:
    """What a DIP figure would run: its images (found under ``data_root``, else the planned count), the jobs
    (images x blocks x backbones), the weights and their presence, the FLOPs; nothing runs."""
    from ..paper.workload import backbone_dims, reference_flops
    from ..paper.plans import FGVC_FOLDERS
    out = Path(out)
    slices = FIG_IMAGES[plan.name][1] or [("cub", None, FIG9_IMAGES)]
    datasets = [{"benchmark": "fgvc", "task": t, "folder": str(Path(data_root) / FGVC_FOLDERS[t]),
                 "present": (Path(data_root) / FGVC_FOLDERS[t]).is_dir()} for t in dict.fromkeys(s[0] for s in slices)]
    try:
        images, found = [str(p) for p in plan_images(plan.name, data_root)], True
    except FileNotFoundError:
        images, found = [], False
    n_images = len(images) if found else sum(c for _, _, c in slices)
    rows, total = [], 0
    for bb in plan.backbones:
        depth = backbone_dims(bb)["depth"]
        flops = n_images * sum(dip_job_flops(bb, k) for k in range(1, depth + 1))
        done = len(list((out / "jobs" / bb).glob("*/block_*/results.json")))
        rows.append({"backbone": bb, "images": n_images, "blocks": depth, "jobs": n_images * depth,
                     "steps": DEFAULTS["steps"], "jobs_done": done, "flops": flops})
        total += flops
    from ..paper.inputs import weights_rows
    w = weights_rows(plan.backbones, weights, ())
    return {"plan": plan.name, "kind": "dip", "out": str(out), "datasets": datasets, "weights": w,
            "images": images, "images_from": "found under --data-root" if found else "planned count: datasets not found",
            "jobs": rows, "runs": sum(r["jobs"] for r in rows), "dip_steps": sum(r["jobs"] * r["steps"] for r in rows),
            "flops": total, "reference_images": total / reference_flops()}

def render_reconstruct(plan, results, out_dir) -> List[Path]:
    """The summary of the jobs already finished under ``out_dir`` (reconstruct.md first)."""
    out_dir = Path(out_dir)
    found = sorted((out_dir / "jobs").glob("*/*/block_*/results.json"))
    if not found:
        raise ValueError(f"{plan.name}: no finished reconstruction under {out_dir} yet")
    from ..sweep.jobs import Job
    jobs = [Job(kind="recon", name=str(f.parent.relative_to(out_dir)), folder=f.parent, overrides={}, target=TARGET)
            for f in found]
    summary = summarise(jobs, out_dir)
    return [out_dir / "reconstruct.md", out_dir / "reconstruct.json"] + [Path(p) for p in summary["png"].values()]
