"""What a plan needs before it runs: dataset folders, weights files, each spec's overrides and jobs; the dry run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import config as C
from .plans import ADE20K_FOLDER, FGVC_FOLDERS, PRESETS, Plan, ReproduceError, RunSpec


# -- checks before any run ----------------------------------------------------------------------
def dataset_folder(data_root: Path, spec: RunSpec) -> Path:
    """Where --data-root holds a spec's dataset: FGVC <root>/<CUB_200_2011 ...>, VTAB <root>/<task>,
    ADE20K <root>/ADEChallengeData2016."""
    if spec.benchmark == "fgvc":
        return Path(data_root) / FGVC_FOLDERS[spec.task]
    if spec.benchmark == "ade20k":
        return Path(data_root) / ADE20K_FOLDER
    return Path(data_root) / spec.task


def _data_override(data_root: Path, spec: RunSpec) -> str:
    folder = data_root if spec.benchmark == "vtab" else dataset_folder(data_root, spec)
    return f"data.root={_quote(str(folder))}"


def _quote(value: str) -> str:
    return value.replace(",", "\\,")


def parse_weights(items: Sequence[str], backbones: Sequence[str]) -> Dict[str, str]:
    """``--weights FILE`` (a plan with one backbone) or ``--weights BACKBONE=FILE`` (repeatable)."""
    out: Dict[str, str] = {}
    plain = [w for w in items if "=" not in w]
    for w in items:
        if "=" in w:
            bb, path = w.split("=", 1)
            if bb not in backbones:
                raise ReproduceError(f"--weights {w}: this plan has no backbone {bb!r} (it uses {', '.join(backbones)})")
            out[bb] = path
    if plain:
        if len(plain) > 1 or len(backbones) > 1:
            raise ReproduceError(f"this plan uses {len(backbones)} backbones ({', '.join(backbones)}): give "
                                 f"--weights BACKBONE=FILE for each (or --backbone to run one)")
        out[backbones[0]] = plain[0]
    return out


def check_inputs(plan: Plan, data_root: Path, weights: Dict[str, str], user_keys: Sequence[str]) -> None:
    """Every dataset folder and weights file the plan needs exists, or one error naming all that miss."""
    missing = []
    for spec in plan.specs:
        folder = dataset_folder(data_root, spec)
        if not folder.is_dir() and f"{spec.benchmark} {spec.task}" not in " ".join(missing):
            missing.append(f"{spec.benchmark} {spec.task} (looked for {folder})")
    if missing:
        raise ReproduceError(f"--data-root {data_root}: missing dataset(s): " + "; ".join(missing))
    if "weights" in user_keys:
        return
    for bb in sorted({s.backbone for s in plan.specs}):
        path = weights.get(bb)
        if path is None:
            raise ReproduceError(f"no weights for backbone {bb}: give --weights FILE or --weights {bb}=FILE")
        if not Path(path).is_file():
            raise ReproduceError(f"weights file for {bb} not found: {path}")


# -- running ------------------------------------------------------------------------------------
def spec_overrides(spec: RunSpec, data_root: Path, weights: Dict[str, str], user: Sequence[str]) -> List[str]:
    """The preset's overrides, in order: the spec's, the dataset and weights, then the user's."""
    out = list(spec.overrides) + [_data_override(data_root, spec)]
    if spec.backbone in weights:
        out.append(f"weights={_quote(weights[spec.backbone])}")
    return out + list(user)


def spec_jobs(spec: RunSpec, out: Path, overrides: Sequence[str], seeds: int):
    """The final runs of a spec with published settings: seeds 42.. (the preset's seed + i), data.final=true."""
    from ..sweep.jobs import Job
    folder = out / spec.name
    jobs = []
    try:
        base = C.load_config(str(PRESETS / spec.preset), list(overrides))
        error = None
    except C.ConfigError as e:
        base, error = None, f"ConfigError: {e}"
    for i in range(seeds):
        seed = (base.train.seed if base else 42) + i
        job = Job("final", f"{spec.name}/final/seed{seed}", folder / "final" / f"seed{seed}", {}, seed=seed,
                  runner=spec.runner)
        if base is not None:
            job.cfg = dataclasses.replace(base, out=str(job.folder), data=dataclasses.replace(base.data, final=True),
                                          train=dataclasses.replace(base.train, seed=seed))
        job.config_error = error
        jobs.append(job)
    return jobs


def _epochs(cfg: C.RunConfig) -> int:
    return cfg.seg.iterations if cfg.data.format == "ade20k" else cfg.train.epochs


# -- the dry run: inputs, runs and their work -------------------------------------------------------
def plan_backbones(plan: Plan) -> List[str]:
    """The backbones a plan needs weights for (a DIP figure names them in ``plan.backbones``)."""
    return sorted({s.backbone for s in plan.specs}) or list(getattr(plan, "backbones", []))


def weights_rows(backbones: Sequence[str], weights: Dict[str, str], user: Sequence[str]) -> List[Dict[str, Any]]:
    """Per backbone: the weights file given (a ``weights=`` override wins), whether it exists, where to get it."""
    given = [o.split("=", 1)[1] for o in user if o.split("=", 1)[0].strip() == "weights"]
    rows = []
    for bb in backbones:
        path = given[-1] if given else weights.get(bb)
        hint = ""
        if path is None:
            try:
                from ..model.backbones import resolve_spec
                hint = resolve_spec(bb).download
            except (ImportError, ValueError):
                pass
        rows.append({"backbone": bb, "file": path, "present": bool(path) and Path(path).is_file(), "download": hint})
    return rows


def dry_run(plan: Plan, out: Path, data_root: Path, weights: Dict[str, str], user: Sequence[str],
            seeds: int, time_per_image: Optional[float] = None) -> Dict[str, Any]:
    """What would run, touching nothing: each dataset folder and weights file and whether it is there; per
    spec its runs (trials + finals), settings, epochs (or ADE20K iterations: never added to epochs) and work
    (images processed, FLOPs; :mod:`.workload`); ``time_per_image`` (seconds per reference image) adds
    an estimated wall time. A DIP figure (``plan.dry_run``) lists its jobs instead."""
    from ..sweep.jobs import folder_state
    from ..sweep.run import plan_sweep
    from . import workload as W
    if getattr(plan, "dry_run", None) is not None:
        info = plan.dry_run(plan, out, data_root, weights)
        return W.add_time(info, time_per_image)
    rows, datasets = [], {}
    for spec in plan.specs:
        over = spec_overrides(spec, data_root, weights, user)
        cfg = C.load_config(str(PRESETS / spec.preset), over)
        folder = dataset_folder(data_root, spec)
        datasets.setdefault((spec.benchmark, spec.task), {"benchmark": spec.benchmark, "task": spec.task,
                                                         "folder": str(folder), "present": folder.is_dir()})
        trials = []
        if spec.lr_sweep:
            sp = plan_sweep(str(PRESETS / spec.preset), over + [f"out={out / spec.name}"], spec.grid)
            trials = [j.cfg or cfg for j in sp.trials]
            lrs = ",".join(str(j.overrides.get("train.lr", cfg.train.lr)) for j in sp.trials)
            what = f"lr sweep {lrs} on val, then {seeds} final(s)"
        else:
            what = f"{seeds} final(s) at lr {cfg.train.lr}"
        # FGVC: the seed-42 final is the chosen trial itself (gapt.sweep.reuse copies it, nothing is trained)
        reused = int(bool(trials) and cfg.data.format == "fgvc" and seeds > 0)
        if reused:
            what += f" (seed {cfg.train.seed} reuses the chosen trial)"
        runs = len(trials) + seeds - reused
        done = sum(folder_state(out / spec.name / "final" / f"seed{cfg.train.seed + i}") == "done"
                   for i in range(seeds))
        unit = "iterations" if cfg.data.format == "ade20k" else "epochs"
        rows.append({"name": spec.name, "row": spec.row, "task": spec.task, "benchmark": spec.benchmark,
                     "preset": spec.preset, "overrides": over, "runs": runs, unit: _epochs(cfg), "what": what,
                     "finals_done": done, "work": W.spec_work(spec, cfg, trials, seeds - reused, folder),
                     "settings": f"np={cfg.num_prompts} gi={cfg.gate_init:g} bs={cfg.train.batch_size} "
                                 f"gate={cfg.gate_type} temp={'on' if cfg.learn_temperature else 'off'} "
                                 f"precision={cfg.train.precision}"})
    info = {"plan": plan.name, "out": str(out), "datasets": list(datasets.values()),
            "weights": weights_rows(plan_backbones(plan), weights, user), "specs": rows,
            "runs": sum(r["runs"] for r in rows),
            "epochs": sum(r["runs"] * r["epochs"] for r in rows if "epochs" in r),
            "iterations": sum(r["runs"] * r["iterations"] for r in rows if "iterations" in r)}
    return W.add_time(W.add_totals(info), time_per_image)
