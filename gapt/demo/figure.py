"""The demo's figure: the insertion curve (paper Fig. 1 at micro scale), the selection ratios of
the gated models (paper Fig. 4) and the train loss of every chosen run (did it converge?).
Numbers are drawn as the demo measured them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union


def plot_demo(detail: Dict[str, Dict], gate_entries: Sequence[Tuple[str, Dict]], out_png: Union[str, Path]) -> Path:
    """Left: test top-1 against the block k where prompts are first inserted (vpt@k), one line per
    task that has a sweep, with that task's linear / vpt-deep / gated results as dashed levels and
    its chance level dotted. Middle: selection ratio r_l per block of each gated model. Right:
    train loss per epoch of each method's chosen run (``train_loss`` in its entry), per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..analysis.plotting import save_png

    fig = Figure(figsize=(16.5, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    left, right, losses = fig.subplots(1, 3)
    swept = [(task, d) for task, d in detail.items() if d.get("insertion")]
    for i, (task, d) in enumerate(swept):
        ks = sorted(d["insertion"], key=int)
        colour = f"C{i % 10}"
        left.plot([int(k) for k in ks], [d["insertion"][k]["test_top1"] for k in ks], "o-", color=colour,
                  label=f"{task}: vpt@k")
        styles = {"linear": ":", "vpt-deep": "--", "gated+temperature": "-."}
        for label, style in styles.items():
            if label in d["methods"]:
                left.axhline(d["methods"][label]["test_top1"], color=colour, linestyle=style, linewidth=1,
                             label=f"{task}: {label}")
        left.axhline(d["chance"], color="grey", linestyle=(0, (1, 3)), linewidth=1, label=f"{task}: chance")
    if swept:
        depth = max(int(k) for _, d in swept for k in d["insertion"])
        left.set_xticks(range(1, depth + 1))
    left.set_xlabel("block k where prompts are first inserted (vpt@1 = VPT-shallow)")
    left.set_ylabel("test top-1 (%)")
    left.set_title("Insertion sweep (paper Fig. 1, micro scale)")
    if swept:
        left.legend(fontsize="x-small")

    width = 0.8 / max(1, len(gate_entries))
    for i, (label, values) in enumerate(gate_entries):
        ratio = [float(r) for r in values["selection_ratio"]]
        xs = [b + 1 + (i - (len(gate_entries) - 1) / 2) * width for b in range(len(ratio))]
        right.bar(xs, ratio, width=width, color=f"C{i % 10}",
                  label=f"{label} (inserted prompt weight {float(values['inserted_prompt_weight']):.3g})")
    if gate_entries:
        right.set_xticks(range(1, max(len(v["selection_ratio"]) for _, v in gate_entries) + 1))
        right.legend(fontsize="x-small")
    right.set_xlabel("block l")
    right.set_ylabel("selection ratio r_l")
    right.set_title("Gated prompts: which blocks feed the last prompt (Fig. 4)")

    styles = ("-", "--", "-.", ":")
    for t, (task, d) in enumerate(detail.items()):
        for m, (label, entry) in enumerate(d["methods"].items()):
            curve = entry.get("train_loss") or []
            losses.plot(range(1, len(curve) + 1), curve, styles[t % len(styles)], color=f"C{m % 10}",
                        marker=".", label=f"{task}: {label} (lr {entry['lr']:g})")
    losses.set_yscale("log")
    losses.set_xlabel("epoch")
    losses.set_ylabel("train loss (log scale)")
    losses.set_title("Train loss of each chosen run")
    if any(d["methods"] for d in detail.values()):
        losses.legend(fontsize="xx-small", ncol=2)
    return save_png(fig, out_png)
