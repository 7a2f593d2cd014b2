"""``gapt analyze insertion``: top-1 against the block where prompts are first inserted (Fig. 1).

One ordinary training run ``vpt-at-block`` per block k and per backbone (each backbone with its
own weights and lr, as the paper ran MAE, MoCo v3 and a supervised ViT), submitted as jobs to
the sweep executors (inline, worker processes, or Ray), so one machine or many run the same
plan; finished runs are skipped and interrupted ones resumed. Writes ``insertion.png`` (one
curve per backbone), ``insertion.json`` (the plotted numbers) and ``insertion.md``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .. import config as C
from .plotting import fmt, new_figure, save_png, write_text

log = logging.getLogger("gapt")

def backbone_depth(cfg) -> int:
    from ..model.backbones import create_vit, resolve_spec
    spec = resolve_spec(cfg.backbone)
    if spec.arch.get("depth"):
        return int(spec.arch["depth"])
    return len(create_vit(spec, cfg.image_size).blocks)

def _check_same_run(run_dir: Path, cfg) -> None:
    """A folder found on disk must hold the run this sweep would start, or resuming / skipping lies."""
    from ..engine import runfolder as rf
    saved_path = run_dir / rf.CONFIG
    if not saved_path.is_file():
        return
    differ = C.run_differences(C.load_config(str(saved_path), saved=True), cfg)
    if differ:
        raise ValueError(f"{run_dir} holds a run with another config (differs in: "
                         + ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in differ.items())
                         + "); choose another out=... for this sweep")

def insertion_config(cfg, block: int):
    """The run of the sweep at block ``block``: vpt-at-block k, out=<cfg.out>/insert_<k>."""
    return replace(cfg, method="vpt-at-block", insert_at_block=int(block), out=str(Path(cfg.out) / f"insert_{block}"))

def backbone_configs(cfg, backbones: Sequence[Dict[str, Any]]) -> List[Any]:
    """One config per ``{"backbone", "weights", "lr"}`` (weights / lr optional: cfg's), out=<out>/<backbone>.

    No backbones: ``[cfg]`` itself (runs in <out>/insert_k, as a one-backbone sweep always did)."""
    if not backbones:
        return [cfg]
    names = [b["backbone"] for b in backbones]
    out = []
    for b in backbones:
        sub = b["backbone"] if names.count(b["backbone"]) == 1 else f"{b['backbone']}-lr{b.get('lr')}"
        c = replace(cfg, backbone=b["backbone"], out=str(Path(cfg.out) / sub))
        if b.get("weights") is not None:
            c = replace(c, weights=None if str(b["weights"]).lower() in ("null", "none") else b["weights"])
        if b.get("lr") is not None:
            c = replace(c, train=replace(c.train, lr=float(b["lr"])))
        out.append(c)
    return out

def insertion_jobs(cfg, blocks: Optional[Iterable[int]] = None):
    """The vpt@k jobs of one backbone: ``(depth, blocks, [(k, Job, status)])``; status 'finished' for done folders."""
    from ..engine import runfolder as rf
    from ..sweep.jobs import Job
    depth = backbone_depth(cfg)
    blocks = list(range(1, depth + 1)) if blocks is None else sorted(set(int(b) for b in blocks))
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"--blocks {bad}: the backbone {cfg.backbone} has blocks 1..{depth}")
    jobs = []
    for k in blocks:
        cfg_k = insertion_config(cfg, k)
        folder = Path(cfg_k.out)
        _check_same_run(folder, cfg_k)
        job = Job(kind="trial", name=f"insert_{k}", folder=folder, overrides={"insert_at_block": str(k)}, cfg=cfg_k)
        done = (folder / rf.RESULTS).exists()
        jobs.append((k, job, "skipped (finished)" if done else
                     ("resumed" if (folder / rf.RESUME).exists() else "trained")))
    return depth, blocks, jobs

def run_jobs(jobs, executor, what: str = "run") -> Dict[str, Optional[str]]:
    """Prepare each job's folder and hand them to ``executor``; log progress; return {name: error or None}."""
    from ..sweep.jobs import prepare_folder
    total = len(jobs)
    outcome: Dict[str, Optional[str]] = {}
    if not jobs:
        return outcome
    for i, job in enumerate(jobs, 1):
        job.index, job.total = i, total
        prepare_folder(job)
    finished = [0]

    def start(job) -> None:
        job.started = time.time()
        log.info("%s [%d/%d] %s -> %s", what, job.index, total, "resuming" if job.resume else "starting", job.folder)

    def end(job, status: str, error: Optional[str]) -> None:
        finished[0] += 1
        outcome[job.name] = None if status == "done" else (error or status)
        log.info("%s %d/%d finished: %s %s (%.0f s)%s", what, finished[0], total, job.folder.name, status,
                 time.time() - (job.started or time.time()), f": {error}" if error else "")
    executor.run(jobs, start, end)
    return outcome

def insertion_sweep(cfg, blocks: Optional[Iterable[int]] = None, executor=None,
                    backbones: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """Train (or pick up) vpt-at-block k for every k in ``blocks`` (default 1..L) and every backbone, then plot.

    ``backbones``: ``[{"backbone", "weights", "lr"}, ...]`` (default: cfg's one backbone, in cfg.out/insert_k;
    else each in cfg.out/<backbone>/insert_k). ``executor``: from :func:`gapt.sweep.executors.make_executor`
    (default inline). A folder holding a run of a different config is an error naming the keys. Writes
    ``insertion.json`` (``curves``: per backbone its rows; ``runs``: the first curve's rows), ``insertion.md``
    and ``insertion.png`` into ``cfg.out``. Each row records ``frozen_cache_blocks`` from the run's
    results.json: how many frozen blocks the engine computed once instead of every epoch.
    """
    from ..engine import distributed as dist
    from ..engine import runfolder as rf
    from ..sweep.executors import InlineExecutor

    executor = executor or InlineExecutor()
    if cfg.method != "vpt-at-block":
        log.info("insertion sweep: method %s -> vpt-at-block (one run per insertion block)", cfg.method)
    configs = backbone_configs(cfg, backbones)
    plans = [(c, *insertion_jobs(c, blocks)) for c in configs]  # every folder checked before anything trains
    todo = [job for _, _, _, jobs in plans for _, job, status in jobs if status != "skipped (finished)"]
    start = time.time()
    errors = run_jobs(todo, executor, "insertion run")
    curves = []
    for c, depth, ks, jobs in plans:
        rows = []
        for k, job, status in jobs:
            if errors.get(job.name) and not (job.folder / rf.RESULTS).exists():
                rows.append({"block": k, "run": str(job.folder), "status": f"failed: {errors[job.name]}",
                             "test_top1": None, "val_top1": None, "test_top1_last": None, "train_time_s": None,
                             "frozen_cache_blocks": None, "tuned_params": None})
                continue
            if not (job.folder / rf.RESULTS).exists():
                rows.append({"block": k, "run": str(job.folder), "status": "not finished", "test_top1": None,
                             "val_top1": None, "test_top1_last": None, "train_time_s": None,
                             "frozen_cache_blocks": None, "tuned_params": None})
                continue
            results = rf.read_json(job.folder / rf.RESULTS)
            metrics = results.get("metrics", {})
            rows.append({"block": k, "run": str(job.folder), "status": status,
                         "test_top1": metrics.get("test_top1"), "val_top1": metrics.get("val_top1_best"),
                         "test_top1_last": metrics.get("test_top1_last"),
                         "train_time_s": results.get("train_time_s"),
                         "frozen_cache_blocks": results.get("frozen_cache_blocks",
                                                            results.get("prefix_cache_blocks")),  # older runs' name
                         "tuned_params": results.get("tuned_params")})
        curves.append({"backbone": c.backbone, "weights": c.weights, "lr": c.train.lr, "depth": depth,
                       "out": c.out, "runs": rows})
    summary = {"backbone": cfg.backbone if not backbones else [c["backbone"] for c in curves],
               "depth": curves[0]["depth"], "data": {"format": cfg.data.format, "name": cfg.data.name},
               "seed": cfg.train.seed, "learn_temperature": cfg.learn_temperature, "prompt_init": cfg.prompt_init,
               "num_prompts": cfg.num_prompts, "wall_time_s": round(time.time() - start, 3),
               "curves": curves, "runs": curves[0]["runs"]}
    if dist.is_main():
        out = Path(cfg.out)
        summary["table"] = "\n".join(f"### {c['backbone']} (lr {c['lr']})\n\n" + insertion_table(c["runs"])
                                     for c in curves) if len(curves) > 1 else insertion_table(curves[0]["runs"])
        write_text(out / "insertion.json", json.dumps(summary, indent=2) + "\n")
        write_text(out / "insertion.md", summary["table"])
        task = cfg.data.name or cfg.data.format
        summary["png"] = str(plot_insertion(curves, out / "insertion.png", title=f"{task}: prompts inserted at block k"))
    failed = [r for c in curves for r in c["runs"] if r["status"].startswith("failed")]
    if failed:
        log.warning("insertion sweep: %d run(s) failed: %s", len(failed), ", ".join(r["run"] for r in failed))
    return summary

def insertion_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| insert at block k | val top-1 | test top-1 | train time (s) | cached frozen blocks | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cache = "—" if r["frozen_cache_blocks"] is None else str(r["frozen_cache_blocks"])
        lines.append(f"| {r['block']} | {fmt(r['val_top1'])} | {fmt(r['test_top1'])} | "
                     f"{fmt(r['train_time_s'], 1)} | {cache} | {r['status']} |")
    return "\n".join(lines) + "\n"

def plot_insertion(curves: Sequence[Dict[str, Any]], out_png, title: str = "") -> Path:
    """Test top-1 against the insertion block k, one line per backbone (paper Fig. 1); with a single
    backbone also its best val top-1 (dashed)."""
    import math
    ks_all = sorted({r["block"] for c in curves for r in c["runs"]})
    fig = new_figure(max(5.0, 0.45 * len(ks_all) + 3.0), 3.6)
    ax = fig.subplots()
    for c in curves:
        ks = [r["block"] for r in c["runs"]]
        keys = [("test_top1", "o-", "test")] + ([("val_top1", "s--", "val (best)")] if len(curves) == 1 else [])
        for key, style, what in keys:
            ys = [float("nan") if r[key] is None else r[key] for r in c["runs"]]
            if any(not math.isnan(y) for y in ys):
                ax.plot(ks, ys, style, label=f"{c['backbone']} (lr {c['lr']:g})" if len(curves) > 1
                        else f"{what} top-1")
    ax.set_xticks(ks_all)
    ax.set_xlabel("prompts inserted at block k (vpt@k; k=1 is vpt-shallow)")
    ax.set_ylabel("test top-1 (%)" if len(curves) > 1 else "top-1 (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    return save_png(fig, out_png)

# -- `gapt reproduce fig1` ---------------------------------------------------------------------
# SPEC §8, Fig. 1: CUB and KITTI, MAE / MoCo v3 / supervised ViT-B/16, lr per backbone and task.
FIG1_LR = {("cub", "mae_vitb16"): 0.1, ("cub", "sup_vitb16"): 0.1, ("cub", "mocov3_vitb16"): 1.0,
           ("kitti", "mae_vitb16"): 0.1, ("kitti", "sup_vitb16"): 0.1, ("kitti", "mocov3_vitb16"): 0.1}

def plan_fig1():
    """vpt@k for k = 1..12 on CUB and KITTI, one curve per backbone, each run a final run at the paper's lr
    (the VPT-shallow presets' other settings; the supervised backbone takes MAE's). Rendered by :func:`render_fig1`."""
    from ..paper.plans import Plan, RunSpec
    specs = []
    for task, bench in (("cub", "fgvc"), ("kitti", "vtab")):
        for bb in ("mae_vitb16", "mocov3_vitb16", "sup_vitb16"):
            preset_bb = "mae_vitb16" if bb == "sup_vitb16" else bb
            for k in range(1, 13):
                over = ["method=vpt-at-block", f"insert_at_block={k}", "learn_temperature=false",
                        f"train.lr={FIG1_LR[(task, bb)]}"] + ([f"backbone={bb}"] if bb != preset_bb else [])
                specs.append(RunSpec(name=f"{bb}/vpt@{k}/{task}", row=f"vpt@{k}", backbone=bb, method=f"vpt@{k}",
                                     benchmark=bench, task=task, preset=f"{bench}/{preset_bb}/vpt-shallow/{task}.yaml",
                                     overrides=over))
    return Plan("fig1", "Fig. 1: top-1 against the block where prompts are first inserted", specs, render=render_fig1,
                notes=["the supervised ViT-B/16 (sup_vitb16) uses the MAE VPT-shallow preset with its own weights"])

def render_fig1(plan, results, out_dir) -> List[Path]:
    """insertion_<task>.png / .json / .md: a curve per backbone (test top-1 of each vpt@k final run)."""
    out_dir = Path(out_dir) / "figures"
    paths = []
    for task in dict.fromkeys(s.task for s in plan.specs):
        curves = []
        for bb in dict.fromkeys(s.backbone for s in plan.specs if s.task == task):
            rows = []
            for s in (s for s in plan.specs if s.task == task and s.backbone == bb):
                runs = results.get(s.name, [])
                vals = [r["metrics"]["test_top1"] for r in runs if r.get("metrics", {}).get("test_top1") is not None]
                rows.append({"block": int(s.row.split("@")[1]), "run": s.name, "status": "done" if vals else "missing",
                             "test_top1": sum(vals) / len(vals) if vals else None, "val_top1": None,
                             "test_top1_last": None, "train_time_s": None, "frozen_cache_blocks": None,
                             "tuned_params": None, "seeds": len(vals)})
            curves.append({"backbone": bb, "lr": FIG1_LR[(task, bb)], "runs": rows})
        write_text(out_dir / f"insertion_{task}.json", json.dumps({"task": task, "curves": curves}, indent=2) + "\n")
        md = write_text(out_dir / f"insertion_{task}.md", "\n".join(
            f"### {c['backbone']} (lr {c['lr']})\n\n" + insertion_table(c["runs"]) for c in curves))
        png = plot_insertion(curves, out_dir / f"insertion_{task}.png", title=f"{task}: prompts inserted at block k")
        paths += [md, out_dir / f"insertion_{task}.json", png]
    return paths
