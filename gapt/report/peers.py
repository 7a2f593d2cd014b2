"""The report's section on the methods GaPT is compared with today: each of our runs of a peer method
(SPT, VIPAMIN, VFPT, E2VPT, DA-VPT(+), the PEFT baselines, ...) beside that method's published
numbers (SPEC §12.7, :mod:`gapt.paper.peers`).

Per (benchmark, backbone, method key that stands for a peer, shared settings): VTAB-1k Natural /
Specialized / Structured, both means — the *group* mean (of the three group means) and the *task*
mean (over the 19 tasks) — ours and published, and which of the two the paper itself reports; FGVC:
the 5-dataset mean. Ours is the last epoch's test top-1 (the column the paper comparisons of the report
use); the row names the paper's protocol (``last-epoch`` or ``best-test``: a best-test-epoch number is
selected on test and favours the paper), its source and whether SPEC verified it. Published means are
recomputed from the group numbers (never a printed mean). Rows are built from the report's summary rows,
so a mean that needs a missing task is missing here too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..paper import peers as PE

_GROUPS = ("natural", "specialized", "structured")
MISSING = "—"
COLUMNS = {"vtab": _GROUPS + ("group mean", "task mean"), "fgvc": ("mean",)}


def _mean(values: List[Optional[float]]) -> Optional[float]:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _diff(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def peer_rows(summary_rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per summary group whose method key is a peer's (:data:`gapt.paper.peers.OURS`)."""
    groups: Dict[tuple, Dict[str, Optional[float]]] = {}
    for r in summary_rows:
        if r["benchmark"] not in COLUMNS or PE.peer_of(r["method"]) is None:
            continue
        key = (r["benchmark"], r["backbone"], r["method"], r.get("settings", ""))
        groups.setdefault(key, {})[r["group"] or r["name"]] = r.get("mean_last_epoch")
    rows = []
    for (benchmark, backbone, method, settings), values in groups.items():
        peer = PE.peer_of(method)
        published = PE.peer_row(peer, backbone)
        ours: Dict[str, Optional[float]] = {}
        paper: Dict[str, Optional[float]] = {}
        if benchmark == "vtab":
            for g in _GROUPS:
                ours[g] = values.get(g)
                paper[g] = published.vtab.get(g) if published else None
            ours["group mean"] = _mean([ours[g] for g in _GROUPS])
            ours["task mean"] = values.get("mean")
            paper["group mean"] = published.group_mean() if published else None
            paper["task mean"] = published.task_mean() if published else None
        else:
            ours["mean"] = values.get("mean")
            paper["mean"] = published.fgvc_mean if published else None
        rows.append({"benchmark": benchmark, "backbone": backbone, "method": method, "peer": peer,
                     "label": published.label if published else peer, "settings": settings, "ours": ours,
                     "paper": paper, "diff": {c: _diff(ours[c], paper[c]) for c in ours},
                     "paper_mean": published.paper_mean if published else "",
                     "protocol": published.protocol if published else "",
                     "status": (published.status if benchmark == "vtab" else published.fgvc_status) if published else "",
                     "source": (published.source if benchmark == "vtab" else published.fgvc_source or published.source)
                     if published else "", "notes": published.notes if published else ()})
    order = {p: i for i, p in enumerate(PE.PEER_ORDER)}
    return sorted(rows, key=lambda r: (r["benchmark"] != "fgvc", r["backbone"], order.get(r["peer"], 99), r["method"]))


def _fmt(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return MISSING
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _cell(row: Dict[str, Any], col: str) -> str:
    return f"{_fmt(row['ours'][col])} / {_fmt(row['paper'][col])} ({_fmt(row['diff'][col], True)})"


def peers_markdown(summary_rows: List[Dict[str, Any]]) -> str:
    """The report's "peers" section ('' when no run is of a peer method)."""
    rows = peer_rows(summary_rows)
    if not rows:
        return ""
    out = ["## Peer methods beside their published numbers (SPEC §12.7)", "",
           "Each cell: ours (last epoch, mean over seeds) / published (ours − published). " + PE.mean_note()
           + " 'protocol': how the paper picked its epoch (best-test selects on test and favours the paper); "
           "'status': verified against the paper or README per SPEC, or transcribed without that check.", ""]
    for benchmark, title in (("fgvc", "FGVC — 5-dataset mean"), ("vtab", "VTAB-1k — groups and both means")):
        part = [r for r in rows if r["benchmark"] == benchmark]
        if not part:
            continue
        cols = COLUMNS[benchmark]
        head = ["backbone", "method", "paper row", *cols, "paper prints", "protocol", "status", "source", "settings"]
        out += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in part:
            cells = [r["backbone"], r["method"], r["label"], *(_cell(r, c) for c in cols),
                     r["paper_mean"] if benchmark == "vtab" else "mean", r["protocol"], r["status"], r["source"],
                     r["settings"] or MISSING]
            out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        out.append("")
        for r in part:
            out += [f"> {r['backbone']} {r['label']}: {n}" for n in r["notes"]]
        out.append("")
    return "\n".join(out)


def peers_csv(summary_rows: List[Dict[str, Any]], fields) -> str:
    """The section as report.csv lines after the others (no header; ``section`` = ``peers``, ``paper_table``
    holds the source, status, protocol and the mean the paper prints); '' when there is none."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    for row in _csv_rows(summary_rows, fields):
        writer.writerow({k: "" if v is None else f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def _csv_rows(summary_rows: List[Dict[str, Any]], fields) -> List[Dict[str, Any]]:
    lines = []
    for r in peer_rows(summary_rows):
        for col in r["ours"]:
            row = {k: None for k in fields}
            row.update(section="peers", benchmark=r["benchmark"], backbone=r["backbone"], method=r["method"],
                       group=col if col in _GROUPS else "", name=col, metric="test_top1", mean=r["ours"][col],
                       paper=r["paper"][col], diff=r["diff"][col], settings=r["settings"], select="last",
                       paper_table=f"{r['source']} ({r['status']}, {r['protocol']}, paper prints "
                                   f"{r['paper_mean'] or 'mean'})", mean_last_epoch=r["ours"][col])
            lines.append(row)
    return lines
