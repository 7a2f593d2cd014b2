"""The run folder: config.yaml, metrics.jsonl, results.json, tuned.safetensors, last.pt (resume state).

Every file is written atomically (temporary file + rename), so an interrupted run never leaves
half a file behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List

CONFIG, METRICS, RESULTS, TUNED, RESUME = "config.yaml", "metrics.jsonl", "results.json", "tuned.safetensors", "last.pt"


class RunFolderError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch  # here, not at the top: reading a run folder (sweep, report) needs no torch
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON: {e}") from None


def append_metrics(folder: Path, record: Dict) -> None:
    with open(folder / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(folder: Path) -> List[Dict]:
    path = Path(folder) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics(folder: Path, keep: Callable[[Dict], bool]) -> None:
    """Keep only the lines ``keep`` accepts: on resume, drop those the resume state does not cover."""
    kept = [r for r in read_metrics(folder) if keep(r)]
    atomic_write_text(Path(folder) / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def check_new_run(folder: Path, command: str = "gapt train") -> None:
    if (folder / RESUME).exists() or (folder / RESULTS).exists():
        raise RunFolderError(f"{folder} already holds a run; continue it with `{command} --resume {folder}` "
                             f"or choose another out=...")


def resume_hint(folder: Path, command: str = "gapt train") -> str:
    """What an interrupted run has saved, and the command that continues it."""
    path = Path(folder) / RESUME
    if not path.exists():
        return (f"nothing to resume in {folder}: the resume file is written when the first epoch ends; "
                f"start the run again")
    try:
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True)
        point = (f"{state['epoch'] + 1} finished epoch(s)" if "epoch" in state else
                 f"{state['iteration']} iterations")
    except Exception:  # noqa: BLE001 - the hint must not hide the interruption
        point = "the last save"
    return f"the state after {point} is saved; continue with `{command} --resume {folder}`"


def check_run_weights(run_dir, weights) -> None:
    """The backbone checkpoint a finished run needs is still there; if not, say how to point at it."""
    if weights in (None, "timm") or Path(weights).is_file():
        return
    raise RunFolderError(f"the backbone checkpoint of run {run_dir} is not found: {weights} (its config.yaml "
                         f"'weights'); if the file moved, give its new place with --weights PATH")


def is_finished(folder) -> bool:
    """A run whose results.json was written: training and test evaluation are done."""
    return (Path(folder) / RESULTS).is_file()
