"""The paper: its published numbers (published), the runs each table needs (plans), what they need
(inputs), the runner of `gapt reproduce` (runner) and its tables (render). May import sweep and below.

Figures' plans live beside their analyses (gapt.analysis); ``PLANS`` finds them by module name when
asked, so this package never imports the analyses (they import it, for Plan and the table plans).
"""
from .inputs import dry_run, parse_weights
from .plans import PLANS, PRESETS, Plan, ReproduceError, RunSpec, get_plan
from .published import TABLES, find_paper_row, method_key, paper_number
from .render import render_plan, render_table
from .runner import run_plan, spec_results

__all__ = ["PLANS", "PRESETS", "Plan", "RunSpec", "ReproduceError", "get_plan", "dry_run", "parse_weights", "run_plan",
           "spec_results", "render_plan", "render_table", "TABLES", "find_paper_row", "method_key", "paper_number"]
