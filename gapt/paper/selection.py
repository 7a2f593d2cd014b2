"""Which epoch's test score a table shows (``--select last | best-val``), read from a run's results.json.

The paper, its reference code (SPEC §6), VPT, VIPAMIN, VFPT and E2VPT all report the test top-1
of the **last epoch**: that is what a table beside the paper's numbers compares with (``last``,
the default). ``best-val`` is the test top-1 at the epoch with the best *held-out* val top-1; a
run whose val is inside its training data (a final run on train + val, e.g. VTAB-1k's
train800val200) never selects an epoch by val, so under ``best-val`` it shows its last epoch.

results.json (gapt.engine.trainer) holds ``metrics.test_top1_last`` always and
``metrics.test_top1_best_val`` when val is held out; ``metrics.selection`` says which one its
``test_top1`` is. Older files (before these keys) are read as written then: ``test_top1`` was the
best-val epoch's, and the last epoch's is known only from ``test_top1_last`` or when the best
epoch was the last. Segmentation metrics (mIoU) are those of the last iteration either way.
Nothing here imports torch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

SELECT_CHOICES = ("last", "best-val")
DEFAULT_SELECT = "last"
SELECTABLE = "test_top1"  # the one metric with an epoch choice


def _number(x: Any) -> Optional[float]:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def check_select(select: str) -> str:
    if select not in SELECT_CHOICES:
        raise ValueError(f"unknown selection {select!r}; choose one of {', '.join(SELECT_CHOICES)}")
    return select


def last_epoch_top1(run: Dict[str, Any]) -> Optional[float]:
    """The test top-1 of the run's last epoch, or None where results.json does not say it."""
    m = run.get("metrics") or {}
    last = _number(m.get("test_top1_last"))
    if last is not None:
        return last
    if m.get("selection") == "last":
        return _number(m.get("test_top1"))
    best, epochs = m.get("best_epoch"), run.get("epochs")
    if isinstance(best, int) and isinstance(epochs, int) and best == epochs:
        return _number(m.get("test_top1"))  # the best-val epoch was the last one
    return None


def held_out_val(run: Dict[str, Any]) -> bool:
    """False for a run whose val images are part of its training data (no epoch may be chosen by val)."""
    return run.get("val_held_out", True) is not False and (run.get("metrics") or {}).get("selection") != "last"


def best_val_top1(run: Dict[str, Any]) -> Optional[float]:
    """The test top-1 at the best held-out-val epoch; a run without held-out val gives its last epoch's."""
    m = run.get("metrics") or {}
    if not held_out_val(run):
        return last_epoch_top1(run)
    value = _number(m.get("test_top1_best_val"))
    return value if value is not None else _number(m.get("test_top1"))


def metric_value(run: Dict[str, Any], metric: str, select: str = DEFAULT_SELECT) -> Optional[float]:
    """``metric`` of a run: test top-1 at the ``select`` epoch, any other metric (mIoU) as recorded."""
    if metric != SELECTABLE:
        return _number((run.get("metrics") or {}).get(metric))
    return last_epoch_top1(run) if check_select(select) == "last" else best_val_top1(run)


def describe(select: str) -> str:
    """One sentence for a table's header: which epoch its numbers come from."""
    if check_select(select) == "last":
        return ("test top-1 of the last epoch: the protocol of the paper and of its reference code (SPEC §6), "
                "which the paper columns compare with")
    return ("test top-1 at the epoch with the best held-out val top-1 (--select best-val); runs whose val is "
            "inside their training data (final runs on train + val) select no epoch by val and show their last "
            "epoch")
