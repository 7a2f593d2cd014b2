"""Sweeps: a grid of trials picked on val, then final runs with several seeds (SPEC §6), as job folders
run by executors (inline, worker processes, Ray Tune). May import engine, data, model, config, tasks.

grid (the grids and KEY=a,b,c overrides) -> jobs (a job and its folder) -> executors / ray_tune (who
runs the jobs) -> run (one sweep: trials, choice, finals, sweep.json; reuse: an FGVC final that is the chosen
trial, copied) -> benchmark (a sweep per task);
commands: `gapt sweep`.
"""
from .benchmark import benchmark_tasks, run_benchmark
from .jobs import Job, SweepError
from .run import SweepPlan, plan_sweep, run_sweep

__all__ = ["Job", "SweepError", "SweepPlan", "plan_sweep", "run_sweep", "benchmark_tasks", "run_benchmark"]
