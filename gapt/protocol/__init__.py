"""Moved in 0.2: ``gapt.protocol`` was split by job into gapt.sweep, gapt.paper, gapt.report and
gapt.analysis. The old module names forward to the new ones for one release, with a FutureWarning.

``from gapt.protocol.reproduce import PLANS`` and ``import gapt.protocol.paper as P`` still work: each
old module is rebuilt from the modules its code went to (``MOVED``; README's changelog lists them).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Dict, Tuple

MOVED: Dict[str, Tuple[str, ...]] = {
    "paper": ("gapt.paper.published",),
    "reproduce": ("gapt.paper.plans", "gapt.paper.inputs", "gapt.paper.runner", "gapt.paper.render"),
    "reproduce_commands": ("gapt.paper.commands",),
    "report": ("gapt.report.collect", "gapt.report.tables", "gapt.report.render"),
    "sweep": ("gapt.sweep.run", "gapt.sweep.benchmark"),
    "sweep_grid": ("gapt.sweep.grid",),
    "sweep_jobs": ("gapt.sweep.jobs",),
    "sweep_executors": ("gapt.sweep.executors",),
    "sweep_ray": ("gapt.sweep.ray_tune",),
    "sweep_commands": ("gapt.sweep.commands",),
    "analyze": ("gapt.analysis.gates", "gapt.analysis.plotting", "gapt.analysis.commands"),
    "analysis_gates": ("gapt.analysis.gates",),
    "gates_plot": ("gapt.analysis.gates_plot", "gapt.analysis.plotting"),
    "analysis_attention": ("gapt.analysis.attention",),
    "analysis_insertion": ("gapt.analysis.insertion",),
    "analysis_reconstruct": ("gapt.analysis.reconstruct", "gapt.analysis.dip"),
    "analysis_ablation": ("gapt.analysis.ablation",),
    "analysis_tokens": ("gapt.analysis.tokens",),
    "analysis_runs": ("gapt.analysis.runs",),
    "analyze_commands": ("gapt.analysis.commands",),
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old name goes in the next release", FutureWarning, stacklevel=3)


class _Forward(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``gapt.protocol.<old>`` and fills it with the names of the modules its code moved to."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        old = module.__name__.rpartition(".")[2]
        _warn(module.__name__, " + ".join(MOVED[old]))
        for name in reversed(MOVED[old]):  # the first module listed wins a name both define
            new = importlib.import_module(name)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})


if not any(isinstance(f, _Forward) for f in sys.meta_path):
    sys.meta_path.insert(0, _Forward())

_NAMES = {"method_key": "gapt.paper.published", "paper_number": "gapt.paper.published",
          "Report": "gapt.report", "build_report": "gapt.report", "collect_runs": "gapt.report",
          "write_report": "gapt.report"}


def __getattr__(name: str):
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _warn(f"{__name__}.{name}", f"{_NAMES[name]}.{name}")
    value = globals()[name] = getattr(importlib.import_module(_NAMES[name]), name)  # warned once
    return value
