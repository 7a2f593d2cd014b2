"""Published numbers of the methods GaPT is compared with today, on self-supervised ViT-B/16 (SPEC §12.7).

The rows are SPEC §12.7's table typed as data, digit for digit: VTAB-1k group numbers (Natural /
Specialized / Structured) per backbone, the printed means beside them, and the FGVC means. gapt's
own published numbers (the GaPT paper's Tables 1-8) live in :mod:`gapt.paper.published`; this
module holds everyone's, GaPT's row included, as the papers that compare with it print it.

Means are recomputed here, never copied: :meth:`PeerRow.group_mean` (the mean of the three group
numbers) and :meth:`PeerRow.task_mean` (the mean over the 19 tasks, i.e. the group numbers weighted
7 / 4 / 8). The printed means are kept only to be checked against the recomputation (tests/test_peers.py);
where a paper's printed mean does not follow from its own group numbers, the row says so in
``notes`` (VFPT's MAE 19-task mean; DA-VPT's table for GaPT and VPT-deep, SPEC §12.7).

Each row records:

- ``source``: the paper table or README its VTAB numbers come from (``fgvc_source`` for FGVC);
- ``protocol``: ``last-epoch`` (test top-1 of the last epoch after an lr search on val200: VPT, GaPT,
  VIPAMIN, VFPT, E2VPT), ``best-test`` (the best test epoch: SPT, DA-VPT), or ``unstated``
  (SPEC names none for the row);
- ``status``: ``verified`` (SPEC §12.7: checked against a paper table or official README) or
  ``transcribed`` (copied from SPEC without that check: DA-VPT and DA-VPT+, SPEC §12.5(e); the
  secondary FGVC numbers of SPT);
- ``paper_mean``: which mean the source paper itself reports: ``task`` (GaPT, VIPAMIN's README and
  the VIPAMIN paper's SPT row, SPEC §12.7), ``group`` (DA-VPT's Tab. 1, whose printed slips are group
  means), ``unstated`` where SPEC does not say. Tables show both means either way.

Which gapt runs a row compares with: :data:`OURS` maps each peer to the method keys
(:func:`gapt.paper.published.method_key`) of gapt's runs of that method. Pure data, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..tasks import FGVC_TASKS, VTAB_GROUPS

GROUPS: Tuple[str, ...] = tuple(VTAB_GROUPS)                      # natural, specialized, structured
GROUP_WEIGHTS: Dict[str, int] = {g: len(t) for g, t in VTAB_GROUPS.items()}  # 7 / 4 / 8 tasks
BACKBONES: Tuple[str, ...] = ("mae_vitb16", "mocov3_vitb16")
PROTOCOLS = ("last-epoch", "best-test", "unstated")
STATUSES = ("verified", "transcribed")


def group_mean(groups: Dict[str, Optional[float]]) -> Optional[float]:
    """The mean of the three group numbers (None when one is missing)."""
    values = [groups.get(g) for g in GROUPS]
    return None if any(v is None for v in values) else sum(values) / len(values)


def task_mean(groups: Dict[str, Optional[float]]) -> Optional[float]:
    """The mean over the 19 tasks from the group numbers: weights 7 / 4 / 8 (None when one is missing)."""
    values = [groups.get(g) for g in GROUPS]
    if any(v is None for v in values):
        return None
    return sum(GROUP_WEIGHTS[g] * v for g, v in zip(GROUPS, values)) / sum(GROUP_WEIGHTS.values())


@dataclass(frozen=True)
class PeerRow:
    peer: str                                  # stable id: full, linear, bias, ..., da-vpt, da-vpt+
    label: str                                 # the papers' name for the method
    backbone: str                              # mae_vitb16 | mocov3_vitb16
    vtab: Dict[str, Optional[float]]           # natural / specialized / structured, as printed
    printed_group_mean: Optional[float] = None
    printed_task_mean: Optional[float] = None
    fgvc_mean: Optional[float] = None          # the printed FGVC mean (5 datasets)
    fgvc: Dict[str, float] = field(default_factory=dict)  # per dataset, where SPEC has them (SPEC §7)
    source: str = ""
    fgvc_source: str = ""
    protocol: str = "unstated"
    status: str = "verified"
    fgvc_status: str = "verified"
    paper_mean: str = "unstated"               # the mean the source paper prints: group | task | unstated
    notes: Tuple[str, ...] = ()

    def group_mean(self) -> Optional[float]:
        return group_mean(self.vtab)

    def task_mean(self) -> Optional[float]:
        return task_mean(self.vtab)

    def fgvc_recomputed_mean(self) -> Optional[float]:
        """The FGVC mean from the per-dataset numbers (only the VPT and GaPT rows have them)."""
        if not all(t in self.fgvc for t in FGVC_TASKS):
            return None
        return sum(self.fgvc[t] for t in FGVC_TASKS) / len(FGVC_TASKS)


_MAE, _MOCO = BACKBONES
_D1 = "DA-VPT (CVPR 2025) Tab. 1"
_V3 = "VFPT (NeurIPS 2024) Tab. 3"
_GAPT = "GaPT (ICML 2023) Tables 1-2 (SPEC §7)"
_LAST = "last-epoch"
_BEST = "best-test"


def _v(n, s, st) -> Dict[str, Optional[float]]:
    return {"natural": n, "specialized": s, "structured": st}


def _pair(peer, label, mae, moco, **kw) -> Tuple[PeerRow, PeerRow]:
    """One method's two rows; ``mae`` / ``moco``: (N, S, St, printed group mean, printed task mean, FGVC mean)
    plus per-backbone keyword overrides in ``kw['mae_kw']`` / ``kw['moco_kw']``."""
    mae_kw, moco_kw = kw.pop("mae_kw", {}), kw.pop("moco_kw", {})
    rows = []
    for bb, vals, extra in ((_MAE, mae, mae_kw), (_MOCO, moco, moco_kw)):
        n, s, st, gm, tm, fm = vals
        rows.append(PeerRow(peer, label, bb, _v(n, s, st), gm, tm, fm, **{**kw, **extra}))
    return rows[0], rows[1]


def _fgvc(values) -> Dict[str, float]:
    return dict(zip(FGVC_TASKS, values))  # CUB / Flowers / Cars / Dogs / NABirds (SPEC §7's order)


_ROWS = (
    _pair("full", "Full fine-tuning", (59.31, 79.68, 53.82, 64.27, 61.28, 82.80),
          (71.95, 84.72, 51.98, 69.55, 66.23, 84.25), source=_D1, fgvc_source=_D1, protocol="unstated",
          paper_mean="group", notes=("SPEC §12.7 names no protocol for this row; SPEC §7 quotes the same 19-task means",))
    + _pair("linear", "Linear probing", (18.87, 53.72, 23.70, None, None, None),
            (67.46, 81.08, 30.33, None, None, None), source=_V3, protocol="unstated",
            notes=("the source prints no mean for this row",))
    + _pair("bias", "Bias (BitFit)", (54.55, 75.68, 47.70, None, None, None),
            (72.89, 81.14, 53.43, None, None, None), source=_V3, protocol="unstated",
            notes=("SPEC §12.6: these rows go back to VPT's and GaPT's tables, which were not checked there",))
    + _pair("adapter", "Adapter", (54.90, 75.19, 38.98, None, None, None),
            (74.19, 82.66, 47.69, None, None, None), source=_V3, protocol="unstated",
            notes=("SPEC §12.6: these rows go back to VPT's and GaPT's tables, which were not checked there",
                   "the papers' Adapter is not AdaptFormer: gapt's adaptformer runs sit beside it for reference"))
    + _pair("vpt-shallow", "VPT-shallow", (39.96, 69.65, 27.50, 45.70, 40.96, 57.84),
            (67.34, 82.26, 37.55, 62.38, 57.94, 79.26), source=_D1, fgvc_source=_GAPT, protocol=_LAST,
            paper_mean="group", mae_kw={"fgvc": _fgvc((42.15, 69.15, 43.38, 77.07, 57.43))},
            moco_kw={"fgvc": _fgvc((79.05, 90.47, 71.91, 81.97, 72.92))},
            notes=("the same numbers as GaPT's Table 2 (SPEC §7)",))
    + _pair("vpt-deep", "VPT-deep", (36.02, 60.61, 26.57, 41.07, 37.22, 72.02),
            (70.27, 83.04, 42.38, 65.23, 61.22, 83.12), source=_D1, fgvc_source=_GAPT, protocol=_LAST,
            paper_mean="group", mae_kw={"fgvc": _fgvc((68.33, 80.05, 67.67, 78.83, 65.22)),
                    "notes": ("DA-VPT's table prints the group mean 41.73 (an arithmetic slip for 41.07)",)},
            moco_kw={"fgvc": _fgvc((82.67, 94.41, 79.18, 83.33, 75.99)),
                     "notes": ("DA-VPT's table prints the group mean 65.90 (an arithmetic slip for 65.23)",)})
    + _pair("gapt", "GaPT (gated + temperature)", (47.61, 76.86, 36.80, 53.76, 49.22, 73.39),
            (74.84, 83.38, 49.10, 69.11, 65.80, 83.00), source=_GAPT, fgvc_source=_GAPT, protocol=_LAST,
            paper_mean="task",
            mae_kw={"fgvc": _fgvc((70.56, 78.55, 71.70, 78.90, 67.26)),
                    "notes": ("DA-VPT's table prints the group mean 53.09 (an arithmetic slip for 53.76)",)},
            moco_kw={"fgvc": _fgvc((82.86, 93.71, 79.02, 83.37, 76.02))})
    + _pair("e2vpt", "E2VPT", (59.52, 77.80, 44.65, 60.66, 57.11, None),
            (76.47, 87.28, 54.91, 72.89, 69.67, None), source=_D1, protocol=_LAST, paper_mean="group")
    + _pair("vfpt", "VFPT", (53.59, 77.75, 36.15, 55.83, 49.94, None),
            (77.47, 85.76, 58.74, 73.99, 71.33, None), source=_V3, protocol=_LAST,
            mae_kw={"notes": ("the printed 19-task mean 49.94 does not follow from the printed group numbers "
                              "(7/4/8 weights give 51.33); the recomputed mean is the one compared",)})
    + _pair("spt-shallow", "SPT-shallow", (62.53, 80.90, 53.46, 65.63, 62.58, 73.95),
            (74.47, 83.93, 55.16, 71.19, 68.33, None), source="VIPAMIN (NeurIPS 2025) paper",
            fgvc_source="BPT paper / paperswithcode (secondary)", fgvc_status="transcribed", protocol=_BEST,
            paper_mean="task")
    + _pair("spt-deep", "SPT-deep", (67.19, None, None, None, None, 83.26),
            (76.20, None, None, None, None, 86.00), source="arXiv 2402.02382 (SPT), Natural only",
            fgvc_source="BPT paper / paperswithcode (secondary)", fgvc_status="transcribed", protocol=_BEST,
            notes=("only the Natural number is verified; SPEC leaves Specialized and Structured to be "
                   "transcribed from arXiv 2402.02382, so both means are missing",))
    + _pair("vipamin", "VIPAMIN", (62.60, 79.96, 57.47, 66.68, 64.09, None),
            (76.75, 84.14, 56.68, 72.52, 69.86, None), source="VIPAMIN official README", protocol=_LAST,
            paper_mean="task")
    + _pair("da-vpt", "DA-VPT", (62.14, 79.14, 54.31, 65.19, None, 82.17),
            (74.24, 83.21, 55.23, 70.90, None, 85.02), source=_D1, fgvc_source=_D1, protocol=_BEST,
            status="transcribed", fgvc_status="transcribed", paper_mean="group",
            notes=("SPEC §12.5(e): not verified against the paper here (the official README defers to it)",))
    + _pair("da-vpt+", "DA-VPT+ (also tunes biases)", (66.59, 82.96, 59.28, 69.61, 66.96, 83.20),
            (76.86, 84.71, 58.98, 73.52, 70.98, 86.16), source=_D1, fgvc_source=_D1, protocol=_BEST,
            status="transcribed", fgvc_status="transcribed", paper_mean="group",
            notes=("SPEC §12.5(e): not verified against the paper here (the official README defers to it)",))
)

# PEERS[(peer, backbone)] -> row, in the table's order
PEERS: Dict[Tuple[str, str], PeerRow] = {(r.peer, r.backbone): r for r in _ROWS}
PEER_ORDER: Tuple[str, ...] = tuple(dict.fromkeys(r.peer for r in _ROWS))

# gapt's method keys (gapt.paper.published.method_key) whose runs sit beside each peer row. The SPT,
# VIPAMIN, VFPT and E2VPT keys follow the names of those parts (several spellings are accepted).
OURS: Dict[str, Tuple[str, ...]] = {
    "full": ("full",), "linear": ("linear",), "bias": ("bitfit",), "adapter": ("adaptformer",),
    "vpt-shallow": ("vpt-shallow",), "vpt-deep": ("vpt-deep",), "gapt": ("gated+temperature",),
    "e2vpt": ("e2vpt",), "vfpt": ("vfpt",),
    "spt-shallow": ("spt-shallow", "spt", "vpt-shallow+spt"), "spt-deep": ("spt-deep", "vpt-deep+spt"),
    "vipamin": ("vipamin", "vipamin-shallow", "vpt-shallow+vipamin"),
    "da-vpt": ("da-vpt",), "da-vpt+": ("da-vpt+davpt-bias",),
}

# The FGVC printed means' datasets and the benchmarks a row covers.
FGVC_MEAN_OF: Tuple[str, ...] = FGVC_TASKS


def peer_row(peer: str, backbone: str) -> Optional[PeerRow]:
    return PEERS.get((peer, backbone))


def peer_of(method_key: str) -> Optional[str]:
    """The peer a gapt method key stands for (``"da-vpt+davpt-bias"`` -> ``"da-vpt+"``), or None."""
    for peer, keys in OURS.items():
        if method_key in keys:
            return peer
    return None


def rows_for(backbone: str) -> Tuple[PeerRow, ...]:
    return tuple(PEERS[(p, backbone)] for p in PEER_ORDER if (p, backbone) in PEERS)


def mean_note() -> str:
    """One line on the two means, for tables that show both."""
    return ("VTAB-1k means: 'group' = mean of the three group numbers, 'task' = mean over the 19 tasks "
            "(weights 7/4/8); both recomputed from the printed group numbers. 'paper prints' says which "
            "mean the source paper itself reports.")
