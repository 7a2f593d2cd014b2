"""`gapt demo` in its reduced size: every method on every task through the lr rule, real numbers,
the insertion sweep, all files written, and a rerun that reuses the finished work."""
import json
import math

import pytest

from gapt.cli import main
from gapt.demo.run import DEPTH, INSERTION_TASKS, LR_GRID, METHODS, QUICK, TASKS, choose_lr, format_report, \
    standard_error

CHANCE = {"count": "16.7", "shape": "20.0"}   # 6 and 5 classes


def _lines(folder):
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _se(top1, n):  # binomial standard error, in percent
    return 100 * math.sqrt(top1 / 100 * (1 - top1 / 100) / n)


def _rule(folders):
    """The lr rule written out again: best val top-1 after the rung, then lower val loss, then smaller lr."""
    at_rung = {lr: [r for r in _lines(f) if r["epoch"] == QUICK["rung"]][0] for lr, f in folders.items()}
    best = sorted(at_rung.items(), key=lambda kv: (-kv[1]["val_top1"], kv[1]["val_loss"], kv[0]))
    return best[0][0]


def _check_tuned(folder, insert_at_block=1):
    """One method's lr folders: all ran to the rung, only the chosen one to the end; returns its results."""
    lr_folders = {lr: folder / f"lr_{lr:g}" for lr in LR_GRID}
    chosen = _rule(lr_folders)
    for lr, f in lr_folders.items():
        epochs = [r["epoch"] for r in _lines(f)]
        if lr == chosen:
            assert epochs == list(range(1, QUICK["epochs"] + 1)) and (f / "results.json").exists()
        else:  # stopped at the rung: same data, same first epochs, no more
            assert epochs == list(range(1, QUICK["rung"] + 1)) and not (f / "results.json").exists()
    res = json.loads((lr_folders[chosen] / "results.json").read_text())
    assert res["lr"] == chosen and res["epochs"] == QUICK["epochs"] and res["insert_at_block"] == insert_at_block
    assert res["data"]["num_train"] == QUICK["num_train"]
    return chosen, res


def test_demo_quick_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    detail = json.loads((out / "demo.json").read_text())["tasks"]
    labels = [m[0] for m in METHODS]
    assert list(summary) == list(TASKS) and all(list(summary[t]) == labels for t in TASKS)
    for task in TASKS:
        cells = {}
        for label in labels:
            lr, res = _check_tuned(out / task / label)
            top1 = res["metrics"]["test_top1"]
            assert summary[task][label] == top1 and detail[task]["methods"][label]["lr"] == lr
            # the loss curve drawn and printed is the chosen run's own metrics.jsonl
            assert detail[task]["methods"][label]["train_loss"] == [r["loss"] for r in _lines(out / task / label / f"lr_{lr:g}")]
            assert 0 <= top1 <= 100
            cells[label] = f"{top1:.1f} ± {_se(top1, res['metrics']['test_count']):.1f}"
        top = max(summary[task].values())
        row = f"| {task} ({CHANCE[task]} %) | " + " | ".join(
            f"**{cells[l]}**" if summary[task][l] == top else cells[l] for l in labels) + " |"
        assert row in printed   # the run's own numbers, chance level, best in bold
    for task in INSERTION_TASKS:   # vpt@k for every block; vpt@1 is the vpt-shallow run
        curve = detail[task]["insertion"]
        assert sorted(curve, key=int) == [str(k) for k in range(1, DEPTH + 1)]
        assert curve["1"]["test_top1"] == summary[task]["vpt-shallow"]
        for k in range(2, DEPTH + 1):
            _, res = _check_tuned(out / task / "insertion" / f"block_{k}", insert_at_block=k)
            assert res["method"] == "vpt-at-block" and curve[str(k)]["test_top1"] == res["metrics"]["test_top1"]
    for png in ("selection_ratio.png", "demo.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # an interrupted or repeated demo reuses finished runs instead of failing or redoing them
    stamps = {p: p.stat().st_mtime for p in out.rglob("results.json")}
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("results.json")} == stamps
    assert json.loads((out / "summary.json").read_text()) == summary


def test_lr_rule_ties_and_order():
    rungs = {0.2: {"val_top1": 40.0, "val_loss": 1.0}, 1.0: {"val_top1": 50.0, "val_loss": 1.2},
             5.0: {"val_top1": 50.0, "val_loss": 1.1}}
    assert choose_lr(rungs) == 5.0            # best top-1, the tie broken by the lower val loss
    rungs[5.0]["val_loss"] = 1.2
    assert choose_lr(rungs) == 1.0            # a full tie goes to the smaller lr
    rungs[0.2]["val_top1"] = 60.0
    assert choose_lr(rungs) == 0.2


def test_standard_error_and_best_marked():
    assert standard_error(50.0, 100) == pytest.approx(5.0)
    assert standard_error(90.0, 400) == pytest.approx(1.5)
    entry = lambda top1: {"test_top1": top1, "test_count": 100, "lr": 1.0, "rung_val_top1": {"1": 0.0},
                          "best_epoch": 1, "epochs": 1, "tuned_params": 1}
    detail = {"count": {"chance": 100 / 6, "insertion": {},
                        "methods": {"linear": entry(30.0), "vpt-deep": entry(50.0)}}}
    text = format_report(detail, ["linear", "vpt-deep"], quick=True)
    assert "| count (16.7 %) | 30.0 ± 4.6 | **50.0 ± 5.0** |" in text


def test_pretraining_continues_from_an_encoder(tmp_path):
    """scripts/pretrain_demo_mae.py --init: one step from the shipped encoder stays next to it
    (a fresh init would be far away) and the new file records where it started."""
    import importlib.util
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from gapt.demo.run import ASSET
    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_demo_mae.py"
    spec = importlib.util.spec_from_file_location("pretrain_demo_mae", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "next.safetensors"
    module.main(["--init", str(ASSET), "--steps", "1", "--num-images", "128", "--lr", "1e-4", "--out", str(out)])
    before, after = load_file(str(ASSET)), load_file(str(out))
    assert before.keys() == after.keys()
    diff = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < diff < 1e-3          # Adam moves each weight by at most ~lr in one step
    with safe_open(str(ASSET), framework="pt") as f:
        start = f.metadata()
    with safe_open(str(out), framework="pt") as f:
        recipe = json.loads(f.metadata()["recipe"])
    assert recipe["init_from"]["final_loss"] == float(start["final_loss"]) and recipe["lr"] == 1e-4
