"""``gapt e2vpt-prune RUN``: E2VPT's pruning and rewinding (SPEC §12.4(d)), as its official pipeline runs it.

ChengHan111/E2VPT @ 7a66e75e, ``tune_vtab_PruningRewind_CVK.py::main`` (and ``tune_fgvc_PruningRewind.py``): after the
lr x wd grid (``gapt sweep --grid e2vpt``) the chosen (lr, wd) is trained once more and saved ("before_pruning"),
then

1. importance: one pass over its training split gives the signed mean gradient of the loss w.r.t. the token
   mask gamma and the piece mask r (gapt/engine/importance.py, a job of this pipeline);
2. masks: for each token count n (10..90 % of M_p, capped at M_p - 1) the n lowest-scored tokens; for each
   piece count m (10..90 % of 16, capped at 12) each token's m lowest-scored pieces, independently of the
   token masks (gapt/model/parts/kv_prompts.py::prune_masks);
3. rewind: for EVERY (n, m) pair a new model (fresh initialisation, not the trained one and not theta_0), those
   entries of gamma / r set to 0 and both masks frozen (``e2vpt_masks=fixed``), trained with the same settings on
   the same split and scored on val;
4. choice: the best val top-1 at the last epoch (the official ``find_best_MtMtp`` reads ``epoch_{last}``); ties go
   to more masked tokens (then, gapt's rule where the official glob order decides, more masked pieces);
5. finals: the chosen masks on the final split (``data.final=true``), seeds 42, 44, 82, 100, 800.

gapt's pre-pruning run is the run folder given (or the chosen trial of a sweep folder: its settings are the
"before_pruning" run's, which gapt need not train again since its runs are seeded). The official rewinds set no
seed; gapt seeds them with ``--rewind-seed`` (default: the run's seed + 1, an initialisation drawn independently of
the pre-pruning run's; the run's own seed would redraw theta_0). Under OUT (default RUN/prune; for a sweep
folder, SWEEP/prune)::

    importance/           the importance job: job.json, importance.json, results.json
    masks.json            every candidate mask, also as the official files: mask_tokens/{n}_soft_tokens_to_mask.json,
                          mask_tokens_pieces/{m}_soft_tokens_pieces_to_mask.json
    trials/t<n>_p<m>/     one ordinary run folder per pair (the rewinds; ``gapt report`` leaves them out, as a
                          sweep's trials, unless --include-trials)
    final/seed<S>/        one ordinary run folder per seed
    prune.json            the scores, every rewind's val, the choice, the finals and their test mean +- std

Rerunning the same command continues: finished jobs are kept (results.json), interrupted runs resume from
last.pt, failed ones are kept unless ``retry_failed``; a folder holding other settings is an error.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import config as C
from ..engine import runfolder as rf
from .executors import make_executor
from .jobs import Job, SweepError, _write_json, check_same_run, folder_state, prepare_folder, read_error, run_numbers

log = logging.getLogger("gapt.sweep")

PRUNE_FILE, MASKS_FILE = "prune.json", "masks.json"
FINAL_SEEDS = (42, 44, 82, 100, 800)  # tune_vtab_PruningRewind_CVK.py's random_seeds
IMPORTANCE_TARGET = "gapt.engine.importance:importance_job"


# -- the pre-pruning run ----------------------------------------------------------------------------
def source_run(path) -> Path:
    """The pre-pruning run: ``path`` itself, or the chosen trial of the sweep folder ``path``."""
    path = Path(path)
    sweep = path / "sweep.json"
    if sweep.exists() and not (path / rf.CONFIG).exists():
        state = json.loads(sweep.read_text())
        choice = state.get("choice") or {}
        if not choice.get("folder"):
            raise SweepError(f"{sweep} has no chosen trial yet: finish the sweep first")
        path = path / choice["folder"]
    if not (path / rf.RESULTS).exists():
        raise SweepError(f"{path} is not a finished run (no {rf.RESULTS}); give a finished method=e2vpt run folder "
                         f"or a finished gapt sweep folder")
    return path


def load_source(run: Path) -> C.RunConfig:
    cfg = C.load_config(str(run / rf.CONFIG), saved=True)
    names = cfg.components()
    if "e2vpt" not in names or cfg.e2vpt_masks != "learned":
        raise SweepError(f"{run} ran method={cfg.method} e2vpt_masks={cfg.e2vpt_masks}; E2VPT's pruning scores the "
                         f"masks trained as gates: method=e2vpt with e2vpt_masks=learned")
    if not (run / rf.RESUME).exists():
        raise SweepError(f"{run} has no {rf.RESUME}: the importance pass needs its last epoch's state")
    return cfg


# -- jobs --------------------------------------------------------------------------------------------------
def _masked(base: C.RunConfig, tokens: Sequence[int], pieces: Sequence[Sequence[int]], folder: Path, seed: int,
            final: bool) -> C.RunConfig:
    cfg = dataclasses.replace(base, e2vpt_masks="fixed", e2vpt_masked_tokens=[int(t) for t in tokens],
                              e2vpt_masked_pieces=[[int(q) for q in row] for row in pieces], out=str(folder),
                              data=dataclasses.replace(base.data, final=final),
                              train=dataclasses.replace(base.train, seed=int(seed)))
    C.validate(cfg)
    return cfg


def rewind_jobs(base: C.RunConfig, masks: Dict[str, Dict[int, list]], out: Path, seed: int) -> List[Job]:
    """A fresh run per (token count, piece count): every pair, tokens outer (the official double loop)."""
    pairs = [(n, m) for n in sorted(masks["tokens"]) for m in sorted(masks["pieces"])]
    jobs = []
    for i, (n, m) in enumerate(pairs, 1):
        name = f"t{n}_p{m}"
        folder = out / "trials" / name
        cfg = _masked(base, masks["tokens"][n], masks["pieces"][m], folder, seed, final=False)
        job = Job("rewind", name, folder, {"masked_tokens": str(n), "masked_pieces": str(m)}, cfg=cfg, seed=seed,
                  index=i, total=len(pairs))
        job.pair = (n, m)
        jobs.append(job)
    return jobs


def final_jobs(chosen: Job, out: Path, seeds: Sequence[int]) -> List[Job]:
    jobs = []
    for i, seed in enumerate(seeds, 1):
        folder = out / "final" / f"seed{seed}"
        cfg = dataclasses.replace(chosen.cfg, out=str(folder), data=dataclasses.replace(chosen.cfg.data, final=True),
                                  train=dataclasses.replace(chosen.cfg.train, seed=int(seed)))
        jobs.append(Job("final", f"seed{seed}", folder, dict(chosen.overrides), cfg=cfg, seed=int(seed), index=i,
                        total=len(seeds)))
    return jobs


def last_val(folder: Path) -> Optional[float]:
    """Val top-1 of the last epoch run (metrics.jsonl), what the official choice reads."""
    vals = [r["val_top1"] for r in rf.read_metrics(folder) if r.get("val_top1") is not None]
    return vals[-1] if vals else None


def choose(records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """find_best_MtMtp: the best last-epoch val; ties: more masked tokens, then more masked pieces."""
    done = [r for r in records if r.get("status") == "done" and r.get("val_top1_last") is not None]
    return max(done, key=lambda r: (r["val_top1_last"], r["tokens"], r["pieces"]), default=None)


# -- the pipeline ----------------------------------------------------------------------------------------------
class _State:
    """prune.json, kept in step with the jobs (callbacks may come from worker threads)."""

    def __init__(self, out: Path, state: Dict[str, Any]):
        self.out, self.state, self.lock = out, state, threading.Lock()

    def write(self) -> None:
        with self.lock:
            self.state["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
            _write_json(self.out / PRUNE_FILE, self.state)


def _record(job: Job, status: str, error: Optional[str]) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"name": job.name, "folder": str(job.folder), "status": status}
    if hasattr(job, "pair"):
        rec.update(tokens=job.pair[0], pieces=job.pair[1])
    else:
        rec["seed"] = job.seed
    if job.folder.exists() and job.kind != "importance":
        numbers = run_numbers(job.folder, finished=status == "done")
        rec.update({k: numbers[k] for k in ("test_top1", "test_top1_last", "epochs_run") if numbers.get(k) is not None})
        rec["val_top1_last"], rec["val_top1_best"] = last_val(job.folder), numbers.get("val_top1")
    if error:
        rec["error"] = error
    return rec


def _run_jobs(executor, jobs: List[Job], records: Dict[str, Dict[str, Any]], state: _State, retry_failed: bool) -> None:
    """Record each job's folder state, run those that must run, keep ``records`` (by name) up to date."""
    pending = []
    for job in jobs:
        status = folder_state(job.folder)
        if status == "done" or (status in ("failed", "stopped") and not retry_failed):
            records[job.name] = _record(job, status, read_error(job.folder) if status == "failed" else None)
            continue
        records[job.name] = _record(job, "pending", None)
        pending.append(job)
    state.write()
    if not pending:
        return
    for job in pending:
        if job.target is None:
            prepare_folder(job)

    def start(job: Job) -> None:
        job.started = time.time()
        log.info("%s: %s", job.label, "resuming" if job.resume else "start")
        with state.lock:
            records[job.name]["status"] = "running"
        state.write()

    def end(job: Job, status: str, error: Optional[str]) -> None:
        rec = _record(job, status, error)
        with state.lock:
            records[job.name] = rec
        log.info("%s: %s in %.0f s%s", job.label, status, time.time() - (job.started or time.time()),
                 f", val top-1 (last epoch) {rec['val_top1_last']:.2f}" if rec.get("val_top1_last") is not None else
                 (f": {error}" if error else ""))
        state.write()
    executor.run(pending, start, end)


def _importance(executor, src: Path, out: Path, state: _State, retry_failed: bool) -> Dict[str, Any]:
    folder = out / "importance"
    spec = {"run": str(src.resolve())}
    held = folder / "job.json"
    if held.exists() and json.loads(held.read_text()).get("run") != spec["run"]:
        raise SweepError(f"{folder} scored another run ({json.loads(held.read_text()).get('run')}); "
                         f"choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    rf.write_json(held, spec)
    job = Job("importance", "importance", folder, {}, target=IMPORTANCE_TARGET, index=1, total=1)
    records: Dict[str, Dict[str, Any]] = {}
    _run_jobs(executor, [job], records, state, retry_failed)
    if records["importance"]["status"] != "done":
        raise SweepError(f"the importance pass failed: {records['importance'].get('error')} (see {folder})")
    return json.loads((folder / "importance.json").read_text())


def write_masks(out: Path, masks: Dict[str, Dict[int, list]], reverse: bool) -> None:
    """masks.json, and the official mask files (cal_mt_mtp's names and layout) for E2VPT's own rewind code."""
    rf.write_json(out / MASKS_FILE, {"order": "descending" if reverse else "ascending",
                                     "tokens": {str(n): t for n, t in masks["tokens"].items()},
                                     "pieces": {str(m): p for m, p in masks["pieces"].items()}})
    for n, tokens in masks["tokens"].items():
        (out / "mask_tokens").mkdir(parents=True, exist_ok=True)
        rf.write_json(out / "mask_tokens" / f"{n}_soft_tokens_to_mask.json", {str(n): tokens})
    for m, pieces in masks["pieces"].items():
        (out / "mask_tokens_pieces").mkdir(parents=True, exist_ok=True)
        rf.write_json(out / "mask_tokens_pieces" / f"{m}_soft_tokens_pieces_to_mask.json",
                      {str(t): row for t, row in enumerate(pieces)})


def _summary(finals: List[Dict[str, Any]], key: str) -> Dict[str, Any]:
    values = [f[key] for f in finals if f.get("status") == "done" and f.get(key) is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values), "values": values}


def run_prune(run, out=None, *, seeds: Sequence[int] = FINAL_SEEDS, rewind_seed: Optional[int] = None,
              reverse: bool = False, executor=None, backend: str = "local", workers: Optional[int] = None,
              preload: Sequence[str] = (), retry_failed: bool = False, dry_run: bool = False) -> Dict[str, Any]:
    """Importance, masks, every rewind, the choice and the finals; returns prune.json's content."""
    from ..model.parts.kv_prompts import prune_masks
    src = source_run(run)
    base = load_source(src)
    out = Path(out) if out else (Path(run) if (Path(run) / "sweep.json").exists() else src) / "prune"
    seed = base.train.seed + 1 if rewind_seed is None else int(rewind_seed)
    if dry_run:
        return _dry_run(src, base, out, seed, reverse, prune_masks)
    if executor is None:
        executor = make_executor(backend, workers, preload, use_gpus=base.device != "cpu")
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out, {"status": "running", "run": str(src), "out": str(out), "method": base.method,
                         "lr": base.train.lr, "weight_decay": base.train.weight_decay, "rewind_seed": seed,
                         "order": "descending" if reverse else "ascending", "seeds": list(seeds),
                         "started": _dt.datetime.now().isoformat(timespec="seconds"), "importance": None,
                         "rewinds": [], "choice": None, "finals": []})
    try:
        scores = _importance(executor, src, out, state, retry_failed)
        state.state["importance"] = {k: scores[k] for k in ("token_scores", "piece_scores", "batches", "lr")}
        masks = prune_masks(scores["token_scores"], scores["piece_scores"], reverse)
        write_masks(out, masks, reverse)
        rewinds = rewind_jobs(base, masks, out, seed)
        finals: List[Job] = []
        for job in rewinds:
            check_same_run(job)
        records: Dict[str, Dict[str, Any]] = {}
        _run_jobs(executor, rewinds, records, _Bound(state, "rewinds", records, rewinds), retry_failed)
        state.state["rewinds"] = [records[j.name] for j in rewinds]
        best = choose(state.state["rewinds"])
        if best is None:
            raise SweepError(f"no rewound run finished; see {out / PRUNE_FILE}")
        chosen = next(j for j in rewinds if j.name == best["name"])
        state.state["choice"] = {"name": chosen.name, "tokens": chosen.pair[0], "pieces": chosen.pair[1],
                                 "val_top1_last": best["val_top1_last"],
                                 "masked_tokens": chosen.cfg.e2vpt_masked_tokens,
                                 "masked_pieces": chosen.cfg.e2vpt_masked_pieces}
        log.info("chosen: %s (val top-1 at the last epoch %.2f)", chosen.name, best["val_top1_last"])
        finals = final_jobs(chosen, out, seeds)
        for job in finals:
            check_same_run(job)
        final_records: Dict[str, Dict[str, Any]] = {}
        _run_jobs(executor, finals, final_records, _Bound(state, "finals", final_records, finals), retry_failed)
        state.state["finals"] = [final_records[j.name] for j in finals]
        state.state["final_test_top1_last"] = _summary(state.state["finals"], "test_top1_last")  # E2VPT's protocol
        state.state["final_test_top1"] = _summary(state.state["finals"], "test_top1")
        unfinished = [f["name"] for f in state.state["rewinds"] + state.state["finals"] if f["status"] != "done"]
        state.state["status"] = "done" if not unfinished else "finished_with_failures"
    except BaseException:
        state.state["status"] = "interrupted" if state.state["status"] == "running" else state.state["status"]
        state.write()
        raise
    state.write()
    return state.state


class _Bound(_State):
    """The pipeline's state whose ``key`` list follows ``records`` (in job order) at every write."""

    def __init__(self, state: _State, key: str, records: Dict[str, Dict[str, Any]], jobs: List[Job]):
        super().__init__(state.out, state.state)
        self.lock, self.key, self.records, self.jobs = state.lock, key, records, jobs

    def write(self) -> None:
        with self.lock:
            self.state[self.key] = [self.records[j.name] for j in self.jobs if j.name in self.records]
        super().write()


def _dry_run(src: Path, base: C.RunConfig, out: Path, seed: int, reverse: bool, prune_masks) -> Dict[str, Any]:
    from ..model.parts.kv_prompts import MIN_PIECES, MIN_TOKENS, mask_counts
    from ..method import E2VPT_PIECES
    scores_path = out / "importance" / "importance.json"
    plan: Dict[str, Any] = {"status": "dry_run", "run": str(src), "out": str(out), "rewind_seed": seed,
                            "importance": folder_state(out / "importance"),
                            "token_counts": mask_counts(base.num_prompts, MIN_TOKENS),
                            "piece_counts": mask_counts(E2VPT_PIECES, MIN_PIECES), "rewinds": []}
    if scores_path.exists():
        scores = json.loads(scores_path.read_text())
        for job in rewind_jobs(base, prune_masks(scores["token_scores"], scores["piece_scores"], reverse), out, seed):
            plan["rewinds"].append({"name": job.name, "status": folder_state(job.folder),
                                    "masked_tokens": job.cfg.e2vpt_masked_tokens})
    else:
        plan["rewinds"] = [{"name": f"t{n}_p{m}", "status": "after the importance pass"}
                           for n in plan["token_counts"] for m in plan["piece_counts"]]
    return plan


def print_summary(state: Dict[str, Any], file=None) -> None:
    import sys
    file = file or sys.stdout
    chosen = (state.get("choice") or {}).get("name")
    for r in state.get("rewinds", []):
        val = r.get("val_top1_last")
        print(f"{'*' if r['name'] == chosen else ' '} rewind {r['name']:10s} {r.get('status', '?'):8s} "
              f"val top-1 (last epoch) {'-' if val is None else f'{val:.2f}'}", file=file)
    for f in state.get("finals", []):
        test = f.get("test_top1_last")
        print(f"  final {f['name']:10s} {f.get('status', '?'):8s} test top-1 (last epoch) "
              f"{'-' if test is None else f'{test:.2f}'}", file=file)
    s = state.get("final_test_top1_last") or {}
    if s.get("n"):
        std = f" +- {s['std']:.2f}" if s.get("std") is not None else ""
        print(f"E2VPT after pruning ({chosen}, {s['n']} seed(s)): test top-1 {s['mean']:.2f}{std} (last epoch)",
              file=file)


__all__ = ["run_prune", "source_run", "rewind_jobs", "final_jobs", "choose", "last_val", "write_masks",
           "print_summary", "FINAL_SEEDS"]
