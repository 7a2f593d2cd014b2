"""Read run folders for a report: every results.json under the given paths, checked, with each run's settings and method key."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..paper.published import ADE20K_METRICS, FGVC_TASKS, VTAB_TASKS
from ..paper.published import method_key as _method_key

RESULTS_FILE = "results.json"
TRIALS_DIR = "trials"  # gapt sweep's folder of trials: <out>/trials/<name>/ (finals: <out>/final/seed<S>/)
MISSING = "—"  # shown in Markdown for a missing value (CSV leaves the cell empty)

REQUIRED_KEYS = ("backbone", "method", "learn_temperature", "prompt_init", "benchmark",
                 "task", "seed", "metrics")

# One CSV row per task row and per summary row; Markdown shows a subset.
CSV_FIELDS = ("section", "benchmark", "backbone", "method", "group", "name", "metric",
              "mean", "std", "n_seeds", "seeds", "num_prompts", "final",
              "paper", "diff", "present", "mean_over_present",
              "gate_type", "settings", "paper_table", "total_params", "paper_total_params",
              "select", "mean_last_epoch")

# What a run was, besides its seed: runs pool into one row only when all of these agree.
SETTING_KEYS = ("num_prompts", "gate_type", "gate_temperature", "gate_init", "lr", "weight_decay", "batch_size",
                "epochs", "iterations", "prompt_dropout", "pooling", "precision", "tf32", "final")
# Settings of one method part, kept apart only in runs of that part (a method name in the '+' composition, or
# the prompt init): two LoRA ranks or two Fourier fractions are never pooled.
PART_SETTING_KEYS = {"lora": ("lora_rank", "lora_alpha", "lora_targets"),
                     "adaptformer": ("adapter_dim", "adapter_scale"),
                     "vfpt": ("fourier_fraction",),
                     "e2vpt": ("kv_prompts", "e2vpt_masks", "e2vpt_masked_tokens", "e2vpt_masked_pieces"),
                     "da-vpt": ("davpt_proxy_len", "davpt_patch_weight", "davpt_cls_weight"),
                     "spt": ("spt_images",), "vipamin": ("vipamin_k", "vipamin_lambda")}
# Settings the paper picks per task (Table 5): a benchmark mean may combine tasks that differ in them.
PER_TASK_KEYS = {"fgvc": ("lr", "gate_init", "batch_size", "weight_decay"),
                 "vtab": ("lr", "gate_init", "batch_size", "weight_decay", "num_prompts")}
_SHORT = {"num_prompts": "np", "gate_type": "gate", "gate_temperature": "t", "gate_init": "gi", "lr": "lr",
          "weight_decay": "wd", "batch_size": "bs", "epochs": "ep", "iterations": "it", "prompt_dropout": "pd",
          "pooling": "pool", "precision": "", "tf32": "", "final": ""}

_BENCHMARK_ORDER = ("fgvc", "vtab", "ade20k")
_METHOD_ORDER = ("linear", "full", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
_SUMMARY_LABELS = {"natural": "Natural (7)", "specialized": "Specialized (4)",
                   "structured": "Structured (8)"}


# ----------------------------------------------------------------------------- loading

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def primary_metrics(benchmark: str) -> Tuple[str, ...]:
    """The metrics reported for a benchmark: ``test_top1``, or mIoU (+ multi-scale) for segmentation."""
    return ADE20K_METRICS if benchmark in ("ade20k", "seg_folder") else ("test_top1",)


def validate_run(run: Dict[str, Any], source: str = "<run>") -> None:
    """Raise ValueError naming ``source`` and the first missing or malformed key."""
    if not isinstance(run, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(run).__name__}")
    for key in REQUIRED_KEYS:
        if key not in run:
            raise ValueError(f"{source}: missing required key {key!r}")
    for key in ("backbone", "method", "benchmark", "task", "prompt_init"):
        if not isinstance(run[key], str) or not run[key]:
            raise ValueError(f"{source}: key {key!r} must be a non-empty string, got {run[key]!r}")
    if not isinstance(run["learn_temperature"], bool):
        raise ValueError(f"{source}: key 'learn_temperature' must be true or false, "
                         f"got {run['learn_temperature']!r}")
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
        raise ValueError(f"{source}: key 'seed' must be an integer, got {run['seed']!r}")
    if "final" in run and not isinstance(run["final"], bool):
        raise ValueError(f"{source}: key 'final' must be true or false, got {run['final']!r}")
    metrics = run["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"{source}: key 'metrics' must be an object, got {type(metrics).__name__}")
    required_metric = primary_metrics(run["benchmark"])[0]
    if required_metric not in metrics:
        raise ValueError(f"{source}: missing required key 'metrics.{required_metric}'")
    for name in primary_metrics(run["benchmark"]):
        value = metrics.get(name)
        if name != required_metric and value is None:
            continue  # optional metric (mIoU_ms): absent or null means missing
        if not _is_number(value):
            raise ValueError(f"{source}: key 'metrics.{name}' must be a finite number, got {value!r}")


def load_run(path: Union[str, Path]) -> Dict[str, Any]:
    """Read one ``results.json`` (or the run folder holding it) and validate it.

    The returned dict is the JSON object plus ``run_dir`` (the folder it came from).
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{file}: cannot read: {e}") from e
    try:
        run = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e
    validate_run(run, str(file))
    run = dict(run)
    run["run_dir"] = str(file.parent)
    return run


def collect_runs(paths: Union[str, Path, Iterable[Union[str, Path]]]) -> List[Dict[str, Any]]:
    """Every run folder (a folder holding ``results.json``) under ``paths``, recursively.

    A path may be a folder (searched recursively; folders without results.json are
    skipped, nested run folders such as sweep trials are found) or a results.json file.
    A run reached twice through overlapping paths is read once. Runs come back sorted
    by folder. A path that does not exist raises FileNotFoundError; a results.json
    that is not valid JSON or lacks a required key raises ValueError naming the file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: List[Path] = []
    seen = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        if p.is_file():
            found = [p]
        else:
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                if RESULTS_FILE in filenames:
                    found.append(Path(dirpath) / RESULTS_FILE)
        for f in found:
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                files.append(f)
    files.sort(key=lambda f: str(f))
    return [load_run(f) for f in files]


def is_sweep_trial(run: Dict[str, Any]) -> bool:
    """A run a sweep made in its ``trials/`` folder (``<sweep out>/trials/<name>/``, not final). A plain
    ``gapt train`` run is no trial, whatever its ``final`` says (``data.final=false`` is every run's default)."""
    run_dir = run.get("run_dir")
    return bool(run_dir) and Path(run_dir).parent.name == TRIALS_DIR and run.get("final") is not True


# ----------------------------------------------------------------------------- report

def run_settings(run: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    """The settings a run stands for (:data:`SETTING_KEYS` that apply to its method; absent keys left out),
    plus ``("trial", True)`` for a sweep trial (never pooled with plain runs of the same settings)."""
    out = []
    if is_sweep_trial(run):
        out.append(("trial", True))
    for key in SETTING_KEYS:
        value = run.get(key, True if key == "final" else None)
        if key == "gate_type" and run["method"] == "gated" and value is None:
            value = "soft"  # results.json from before hard gates
        if key in ("gate_type", "gate_temperature", "gate_init") and run["method"] != "gated":
            continue
        if key == "gate_temperature" and run.get("gate_type", "soft") != "hard":
            continue
        if value is not None:
            out.append((key, value))
    parts = set(str(run["method"]).split("+")) | {run.get("prompt_init", "random")}
    for part in sorted(parts & set(PART_SETTING_KEYS)):
        out += [(key, run[key]) for key in PART_SETTING_KEYS[part] if run.get(key) not in (None, "", [])]
    return tuple(out)


def settings_text(settings: Sequence[Tuple[str, Any]]) -> str:
    """``np=100 gate=hard t=1 lr=0.1 ... fp32 final`` (what a row stands for, in one cell)."""
    parts = []
    trial = dict(settings).get("trial", False)
    for key, value in settings:
        if key == "trial":
            continue
        if key == "final":
            parts.append("final" if value else "trial" if trial else "data.final=false")
        elif key == "precision":
            parts.append(str(value))
        elif key == "tf32":
            parts.append("tf32" if value else "no-tf32")
        else:
            short = _SHORT.get(key, key)
            parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def run_method_key(run: Dict[str, Any]) -> str:
    return _method_key(run["method"], run.get("learn_temperature", False),
                       run.get("prompt_init", "random"), run.get("insert_at_block"))


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def _method_sort_key(key: str):
    base = key.split("+")[0]
    if base.startswith("vpt@"):
        rank, k = _METHOD_ORDER.index("vpt-at-block"), int(base[4:]) if base[4:].isdigit() else 0
    elif base in _METHOD_ORDER:
        rank, k = _METHOD_ORDER.index(base), 0
    else:
        rank, k = len(_METHOD_ORDER), 0
    return (rank, k, key.count("+"), key)


def _benchmark_sort_key(b: str):
    return (_BENCHMARK_ORDER.index(b) if b in _BENCHMARK_ORDER else len(_BENCHMARK_ORDER), b)


def _task_sort_key(benchmark: str, task: str):
    order = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}.get(benchmark, ())
    return (order.index(task) if task in order else len(order), task)
