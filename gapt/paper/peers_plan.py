"""`gapt reproduce peers`: every method GaPT is compared with today, each with its own recipe, on one
benchmark and backbone, written as one table beside the published numbers (SPEC §12.7).

    gapt reproduce peers --benchmark vtab --backbone mae_vitb16 --data-root /data/vtab-1k --weights mae.pth
    gapt reproduce peers --benchmark fgvc --backbone mocov3_vitb16 --methods da-vpt,da-vpt+,gated --dry-run

A method's runs come from its presets, ``gapt/configs/<benchmark>/<backbone>/<folder>/<task>.yaml``
(:data:`METHODS`; GaPT's are the Table 5 presets ``<benchmark>/<backbone>/<task>.yaml``). A preset marked
``NEEDS THE LR SWEEP`` is searched on val first, on the grid its recipe calls for (SGD: SPEC §6's lrs;
AdamW: ``adamw``; DA-VPT: ``davpt``; SPT / VIPAMIN: their own), then its final runs; the others run
their finals with the preset's settings. A method without presets is an error at plan time that names
the files it looked for (``--methods`` leaves it out).

The table (``peers.md`` / ``peers.csv``): methods x tasks, ours (the last epoch's test top-1, mean over
seeds) per task, and per mean column ours beside the published number: VTAB-1k Natural / Specialized /
Structured, the group mean and the 19-task mean (both recomputed from the published group numbers),
which of the two the paper prints, its protocol (last-epoch or best-test) and whether SPEC verified it;
FGVC the 5-dataset mean. Nothing here imports torch.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from . import peers as PE
from .plans import PRESETS, Plan, ReproduceError, RunSpec
from .selection import metric_value
from ..tasks import FGVC_TASKS, VTAB_GROUPS, VTAB_TASKS

BENCHMARKS = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}
SWEEP_MARK = "NEEDS THE LR SWEEP"


@dataclass(frozen=True)
class PeerMethod:
    name: str                  # what --methods names
    label: str                 # the table's row
    folder: str                # presets under <benchmark>/<backbone>/<folder>/ ("" = GaPT's Table 5 presets)
    peer: Optional[str]        # the gapt.paper.peers row it sits beside (None: nothing published)
    key: str                   # our runs' method key (gapt.paper.published.method_key)


METHODS = (
    PeerMethod("linear", "Linear probing", "linear", "linear", "linear"),
    PeerMethod("full", "Full fine-tuning", "full", "full", "full"),
    PeerMethod("vpt-shallow", "VPT-shallow", "vpt-shallow", "vpt-shallow", "vpt-shallow"),
    PeerMethod("vpt-deep", "VPT-deep", "vpt-deep", "vpt-deep", "vpt-deep"),
    PeerMethod("gated", "GaPT (gated + temperature)", "", "gapt", "gated+temperature"),
    PeerMethod("lora", "LoRA", "lora", None, "lora"),
    PeerMethod("adaptformer", "AdaptFormer", "adaptformer", "adapter", "adaptformer"),
    PeerMethod("bitfit", "BitFit", "bitfit", "bias", "bitfit"),
    PeerMethod("ssf", "SSF", "ssf", None, "ssf"),
    PeerMethod("spt-shallow", "SPT-shallow", "spt-shallow", "spt-shallow", PE.OURS["spt-shallow"][-1]),
    PeerMethod("spt-deep", "SPT-deep", "spt-deep", "spt-deep", PE.OURS["spt-deep"][-1]),
    PeerMethod("vipamin", "VIPAMIN", "vipamin", "vipamin", PE.OURS["vipamin"][-1]),
    PeerMethod("vfpt", "VFPT", "vfpt", "vfpt", "vfpt"),
    PeerMethod("e2vpt", "E2VPT", "e2vpt", "e2vpt", "e2vpt"),
    PeerMethod("da-vpt", "DA-VPT", "da-vpt", "da-vpt", "da-vpt"),
    PeerMethod("da-vpt+", "DA-VPT+", "da-vpt-plus", "da-vpt+", "da-vpt+davpt-bias"),
)
BY_NAME = {m.name: m for m in METHODS}
ALIASES = {"spt": ("spt-shallow", "spt-deep"), "gated+temperature": ("gated",), "gapt": ("gated",)}


def _methods(names: Optional[Sequence[str]]) -> List[PeerMethod]:
    if not names:
        return list(METHODS)
    out: List[PeerMethod] = []
    for raw in names:
        for name in ALIASES.get(raw.strip(), (raw.strip(),)):
            if name not in BY_NAME:
                raise ReproduceError(f"peers: unknown method {name!r}; choose from {', '.join(BY_NAME)} (spt = both)")
            if BY_NAME[name] not in out:
                out.append(BY_NAME[name])
    return out


def _grid(preset: Path) -> str:
    """The sweep grid a preset's recipe calls for (gapt.sweep.grid.GRIDS)."""
    cfg = yaml.safe_load(preset.read_text()) or {}
    method, init = str(cfg.get("method", "")), str(cfg.get("prompt_init", "random"))
    if "da-vpt" in method.split("+"):
        return "davpt"
    if init in ("spt", "vipamin"):
        return init
    return "adamw" if (cfg.get("train") or {}).get("optimizer") == "adamw" else "spec"


def plan_peers(benchmark: Optional[str] = None, backbone: Optional[str] = None,
               methods: Optional[Sequence[str]] = None, presets: Path = PRESETS) -> Plan:
    """The runs of ``methods`` (default: all) on ``benchmark`` (fgvc | vtab; default both) with ``backbone``
    (default both of SPEC §12.7's); a method without a preset for some task is an error naming the files."""
    benches = [benchmark] if benchmark else list(BENCHMARKS)
    backbones = [backbone] if backbone else list(PE.BACKBONES)
    for b in benches:
        if b not in BENCHMARKS:
            raise ReproduceError(f"peers: --benchmark must be fgvc or vtab, got {b!r}")
    for bb in backbones:
        if bb not in PE.BACKBONES:
            raise ReproduceError(f"peers: --backbone must be one of {', '.join(PE.BACKBONES)} (the published "
                                 f"numbers' backbones), got {bb!r}")
    specs, missing = [], {}
    for m in _methods(methods):
        for b in benches:
            for bb in backbones:
                for task in BENCHMARKS[b]:
                    rel = f"{b}/{bb}/{m.folder + '/' if m.folder else ''}{task}.yaml"
                    path = Path(presets) / rel
                    if not path.is_file():
                        missing.setdefault(m.name, []).append(rel)
                        continue
                    sweep = SWEEP_MARK in path.read_text()
                    specs.append(RunSpec(name=f"{b}/{bb}/{m.folder or 'gapt'}/{task}", row=m.label, backbone=bb,
                                         method=m.key, benchmark=b, task=task, preset=rel, lr_sweep=sweep,
                                         grid=_grid(path) if sweep else "spec"))
    if missing:
        lines = [f"{name}: {len(files)} preset(s) missing, e.g. gapt/configs/{files[0]}" for name, files in missing.items()]
        raise ReproduceError("peers: no presets for " + "; ".join(lines) + ". Leave those methods out with --methods "
                             f"(e.g. --methods {','.join(m.name for m in _methods(methods) if m.name not in missing)})")
    title = (f"Peer methods on {' and '.join(b.upper() if b == 'fgvc' else 'VTAB-1k' for b in benches)}, "
             f"{', '.join(backbones)}: ours beside the published numbers (SPEC §12.7)")
    plan = Plan("peers", title, specs, table=None, render=render_peers)
    plan.notes += [PE.mean_note(), "ours: the last epoch's test top-1 (mean over seeds); a best-test protocol "
                   "(SPT, DA-VPT) selects on test and favours the published number"]
    return plan


# -- the table --------------------------------------------------------------------------------------
def _mean(xs: List[Optional[float]]) -> Optional[float]:
    return statistics.fmean(xs) if xs and all(x is not None for x in xs) else None


def _fmt(x: Optional[float], signed: bool = False) -> str:
    return "—" if x is None else f"{x:+.2f}" if signed else f"{x:.2f}"


def peer_table(plan: Plan, results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per (benchmark, backbone, method): ours per task and per mean column, the published numbers."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for s in plan.specs:
        m = next(x for x in METHODS if x.label == s.row)
        row = rows.setdefault((s.benchmark, s.backbone, m.name), {"benchmark": s.benchmark, "backbone": s.backbone,
                                                                  "method": m, "tasks": {}, "seeds": set()})
        runs = results.get(s.name, [])
        values = [v for v in (metric_value(r, "test_top1", "last") for r in runs) if v is not None]
        row["tasks"][s.task] = statistics.fmean(values) if values else None
        row["seeds"] |= {r.get("seed") for r in runs if r.get("seed") is not None}
    out = []
    for (benchmark, backbone, _), row in rows.items():
        m, tasks = row["method"], row["tasks"]
        published = PE.peer_row(m.peer, backbone) if m.peer else None
        ours, paper = {}, {}
        if benchmark == "vtab":
            for g, members in VTAB_GROUPS.items():
                ours[g] = _mean([tasks.get(t) for t in members])
                paper[g] = published.vtab.get(g) if published else None
            ours["group mean"] = _mean([ours[g] for g in VTAB_GROUPS])
            ours["task mean"] = _mean([tasks.get(t) for t in VTAB_TASKS])
            paper["group mean"] = published.group_mean() if published else None
            paper["task mean"] = published.task_mean() if published else None
        else:
            ours["mean"] = _mean([tasks.get(t) for t in FGVC_TASKS])
            paper["mean"] = published.fgvc_mean if published else None
        out.append({**row, "ours": ours, "paper": paper, "published": published, "seeds": sorted(row["seeds"])})
    return out


def render_peers(plan: Plan, results: Dict[str, List[Dict[str, Any]]], out_dir) -> List[Path]:
    """``peers.md`` and ``peers.csv`` (a line per method x column: ours, published, difference, provenance)."""
    rows = peer_table(plan, results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {plan.title}", "", "Task columns: ours. Mean columns: ours / published (ours − published); \"—\": "
          "missing (a mean needs every task it covers).", ""] + [f"> {n}" for n in plan.notes] + [""]
    csv = ["benchmark,backbone,method,column,ours,published,diff,paper_prints,protocol,status,source,seeds"]
    for benchmark in BENCHMARKS:
        for backbone in PE.BACKBONES:
            part = [r for r in rows if (r["benchmark"], r["backbone"]) == (benchmark, backbone)]
            if not part:
                continue
            tasks, means = list(BENCHMARKS[benchmark]), list(part[0]["ours"])
            head = ["method", *tasks, *means, "paper prints", "protocol", "status", "source"]
            md += [f"## {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'}, {backbone}", "",
                   "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in part:
                p = r["published"]
                diff = {c: None if r["ours"][c] is None or r["paper"][c] is None else r["ours"][c] - r["paper"][c]
                        for c in means}
                prov = [p.paper_mean if p and benchmark == "vtab" else "mean" if p else "—", p.protocol if p else "—",
                        (p.status if benchmark == "vtab" else p.fgvc_status) if p else "—",
                        (p.source if benchmark == "vtab" else p.fgvc_source or p.source) if p else "nothing published"]
                cells = [r["method"].label, *(_fmt(r["tasks"].get(t)) for t in tasks),
                         *(f"{_fmt(r['ours'][c])} / {_fmt(r['paper'][c])} ({_fmt(diff[c], True)})" for c in means), *prov]
                md.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
                seeds = " ".join(map(str, r["seeds"]))
                for c, v in list(r["tasks"].items()) + [(c, r["ours"][c]) for c in means]:
                    ref = r["paper"].get(c)
                    d = None if v is None or ref is None else v - ref
                    csv.append(",".join([benchmark, backbone, r["method"].name, c, _num(v), _num(ref), _num(d),
                                         *(f'"{x}"' if "," in x else x for x in prov), seeds]))
            md.append("")
            for r in part:
                if r["published"]:
                    md += [f"> {r['method'].label}: {n}" for n in r["published"].notes]
            md.append("")
    paths = [out_dir / "peers.md", out_dir / "peers.csv"]
    paths[0].write_text("\n".join(md), encoding="utf-8")
    paths[1].write_text("\n".join(csv) + "\n", encoding="utf-8")
    return paths


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.4f}"
