"""A final run that is the chosen trial itself: reused (copied), not trained again.

On FGVC a final run trains on ``train.json`` alone and selects on ``val.json`` (SPEC §5, the
reference's choice), exactly as a trial does: ``data.final`` changes no split there. The final at
the trial's own seed (``seed42`` for the presets) is then the same run as the chosen trial: the
same config apart from bookkeeping (``out``, ``data.final`` and :data:`gapt.config.RUN_FREE_KEYS`),
so training it again would only repeat the trial's numbers. :func:`reuse_chosen_trial` checks
that, from the configs the sweep planned *and* the config saved in the trial's folder, then copies
the trial's folder into ``final/seed<S>/`` as a final run:

- results.json: ``"final": true`` and ``"reused_from": "trials/<name>"`` (sweep.json's final record
  shows it too), a note in ``data.notes``; every number as the trial recorded it;
- config.yaml and trial.yaml: the final's config (``out`` = the final folder, ``data.final: true``),
  so ``gapt eval``, ``--resume`` and a restarted sweep see an ordinary finished final run.

The copy is made in a hidden temporary folder and renamed into place, so a sweep killed while
copying leaves either no final folder (the next start copies again) or a complete one (kept as
done). Only a final folder with nothing of value in it (``new``: no results, no resume file, no
error) is replaced; any other format (VTAB-1k: train800val200 is not train800), another seed, or a
config that differs in anything but bookkeeping is trained as before.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from .. import config as C
from ..engine import runfolder as rf
from ..engine.runfolder import CONFIG as RUN_CONFIG
from ..engine.runfolder import RESULTS
from .jobs import ERROR_FILE, STOPPED_FILE, TRIAL_CONFIG, Job, folder_state

log = logging.getLogger("gapt.sweep")

REUSED_KEY = "reused_from"
# Formats whose final split is the trial's own (data.final changes no split): FGVC (SPEC §5).
SAME_SPLITS_WHEN_FINAL = ("fgvc",)
BOOKKEEPING = tuple(C.RUN_FREE_KEYS) + ("data.final",)
_NOT_COPIED = (ERROR_FILE, STOPPED_FILE, "*.tmp", "wandb_run_id")  # a resumed copy must not write to the trial's W&B run


def why_not_reusable(final: Job, chosen: Job) -> Optional[str]:
    """None when ``final`` is the same run as the finished trial ``chosen``; else the reason it is not."""
    if final.cfg is None or chosen.cfg is None or final.target or chosen.target or final.runner or chosen.runner:
        return "not a classification run with a config"
    if chosen.cfg.data.format not in SAME_SPLITS_WHEN_FINAL:
        return f"data.format={chosen.cfg.data.format}: its final split is not the trial's"
    diffs = C.run_differences(chosen.cfg, final.cfg, free_keys=BOOKKEEPING)
    if diffs:
        return "other settings: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diffs.items())[:3])
    if folder_state(chosen.folder) != "done":
        return "the trial has not finished"
    saved = chosen.folder / TRIAL_CONFIG if (chosen.folder / TRIAL_CONFIG).exists() else chosen.folder / RUN_CONFIG
    try:
        old = C.load_config(str(saved), saved=True)
    except (OSError, C.ConfigError) as e:
        return f"the trial's saved config cannot be read ({e})"
    diffs = C.run_differences(old, final.cfg, free_keys=BOOKKEEPING)
    if diffs:
        return "the trial's folder holds other settings: " + "; ".join(f"{k}" for k in list(diffs)[:3])
    try:
        results = json.loads((chosen.folder / RESULTS).read_text())
    except (OSError, ValueError) as e:
        return f"the trial's results.json cannot be read ({e})"
    if results.get("val_held_out") is False:
        return "the trial's val is not held out"
    return None


def reuse_chosen_trial(final: Job, chosen: Job, sweep_out: Path) -> bool:
    """Copy the chosen trial into ``final.folder`` as that final run when it is the same run; True if done."""
    if folder_state(final.folder) != "new":
        return False
    why = why_not_reusable(final, chosen)
    if why is not None:
        if final.seed == (chosen.cfg.train.seed if chosen.cfg is not None else None):
            log.info("%s: trained, not reused from trial %s (%s)", final.label, chosen.name, why)
        return False
    rel = os.path.relpath(chosen.folder, sweep_out)
    tmp = final.folder.with_name(f".{final.folder.name}.reusing")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a copy killed half-way
    shutil.copytree(chosen.folder, tmp, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    text = C.to_yaml(final.cfg)
    rf.atomic_write_text(tmp / RUN_CONFIG, text)
    rf.atomic_write_text(tmp / TRIAL_CONFIG, text)
    results = json.loads((tmp / RESULTS).read_text())
    results.update({"final": True, REUSED_KEY: rel})
    if isinstance(results.get("data"), dict):
        results["data"]["notes"] = list(results["data"].get("notes") or []) + [
            f"final run reused from the chosen trial {rel}: the same run (FGVC's final split is the trial's "
            f"train split, same seed and settings), copied instead of trained again"]
    rf.write_json(tmp / RESULTS, results)
    if final.folder.exists():  # "new": at most a trial.yaml or metrics of a start killed before its first epoch
        shutil.rmtree(final.folder)
    final.folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final.folder)
    log.info("%s: the same run as the chosen trial %s (FGVC: same split, seed %s and settings): copied, "
             "not trained again", final.label, rel, final.seed)
    return True
