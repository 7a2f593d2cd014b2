"""``gapt report``: collect run folders (collect), pool seeds into rows (tables), write Markdown/CSV (render).
May import gapt.paper.published (the numbers it compares with), config and tasks; nothing that trains.

Tables of finished runs next to the paper's numbers.

A *run folder* is any folder holding a ``results.json`` written by the training engine::

    {"backbone": "mae_vitb16", "method": "gated", "learn_temperature": true,
     "prompt_init": "random", "num_prompts": 100, "benchmark": "fgvc", "task": "cub",
     "seed": 42, "final": true,
     "metrics": {"val_top1_best": 71.2, "best_epoch": 87, "test_top1": 70.9, "test_top1_last": 70.4,
                 "test_top1_best_val": 70.9, "selection": "best-val", ...}, ...}

Which epoch (``select``, :mod:`gapt.paper.selection`): ``last`` (the default) reports each run's
last-epoch test top-1, the protocol of the paper and its reference code (SPEC §6); ``best-val``
the test top-1 at the best held-out-val epoch (a run whose val is inside its training data has
none and shows its last epoch). The paper columns always compare with ours at the last epoch:
under ``best-val`` a column "ours (last epoch)" sits beside them. The report's header says which.

Segmentation runs have ``"benchmark": "ade20k"`` and ``metrics.mIoU`` (single-scale,
required) and optionally ``metrics.mIoU_ms`` (multi-scale).

A report row pools only runs that differ in seed alone: rows are keyed by benchmark, backbone,
method key (:func:`gapt.paper.published.method_key`, e.g. ``gated+temperature``), task and the
run's settings (:data:`SETTING_KEYS`: gate type and Gumbel temperature, prompt count, gate init,
lr, weight decay, batch size, epochs, dropout, pooling, precision, final or trial). Runs with
4 and 100 prompts, or two backbone sizes, are never averaged; every row shows the settings it
stands for. Sweep trials (runs in a sweep's ``trials/`` folder: :func:`collect.is_sweep_trial`) are
left out unless ``include_trials=True``; plain ``gapt train`` runs are reported, final or not.

Per task: mean over seeds, sample standard deviation (ddof=1; shown as "-" in Markdown
and left empty in CSV when there is one seed), the number of seeds and the seeds.
Each row sits beside the paper row with the same backbone, method, gate type and prompt
count (:func:`gapt.paper.published.find_paper_row`): Table 1/2/3 at the paper's prompt counts,
Table 4 for hard gates, Table 7 for 24/48/96-prompt MAE FGVC, Table 8 for ViT-L MAE / ViT-S
MoCo v3, Table 6 for 24-prompt ADE20K; the ``table`` column names it.
Per (benchmark, backbone, method key, settings shared by the tasks): the FGVC mean over the 5
datasets, the VTAB-1k group means (each the mean of its tasks' means) and the 19-task mean
(the mean of the 19 task means, not of the group means), each next to the paper's number and
the difference ours - paper. lr, gate init, batch size and weight decay may differ between
tasks (the paper picks them per task, Table 5), and on VTAB-1k the prompt count too; a task
with two rows in one summary (two lrs, say) makes that summary's mean missing, with a note.
A mean that needs a missing task is missing ("—" in Markdown, empty in CSV); it is never
taken over the tasks present. The separate column "mean over present k/N" gives that partial
mean, labelled as such, for a look at unfinished sweeps; it is not comparable with the paper.
The total-parameters column is computed as the paper does: (backbone + every task's prompts,
gates, temperatures and head) / backbone, from results.json's ``backbone_params`` and
``tuned_params``, when every task is present.

Runs of other benchmarks (folder, csv, shapes, ...) are listed per task, without paper
columns. ``only_final=True`` is the default behaviour, kept for callers that pass it.
"""
from .collect import collect_runs, load_run, run_method_key, validate_run
from .tables import NoRunsError, Report, build_report, write_report

__all__ = ["Report", "NoRunsError", "build_report", "collect_runs", "load_run", "run_method_key", "validate_run",
           "write_report"]
