"""The paper's analysis figures, one module per family (gates, attention, insertion, reconstruct + dip,
ablation, tokens), each with its plan and render; plotting is what they share. May import report, paper, sweep and below.

Modules are imported on demand (most import torch or matplotlib): ``from gapt.analysis.gates import analyze_gates``.
"""
