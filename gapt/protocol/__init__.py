"""Protocol layer: compose finished runs into reports and analyses.

- :mod:`gapt.protocol.paper`: the paper's published numbers and the method-key rule.
- :mod:`gapt.protocol.report`: ``gapt report`` (per-task and benchmark tables next to the paper).
- :mod:`gapt.protocol.gates_plot`: gates / selection ratio / temperature PNG and table
  (imported on demand; it pulls in matplotlib).
"""
from .paper import method_key, paper_number
from .report import Report, build_report, collect_runs, write_report

__all__ = ["method_key", "paper_number", "Report", "build_report", "collect_runs", "write_report"]
