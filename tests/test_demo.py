"""`gapt demo` in its reduced size: every method on every task, real numbers, all files written."""
import json

from gapt.cli import main
from gapt.demo.run import METHODS, TASKS


def test_demo_quick_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    labels = [m[0] for m in METHODS]
    assert list(summary) == list(TASKS) and all(list(summary[t]) == labels for t in TASKS)
    for task in TASKS:
        for label in labels:
            res = json.loads((out / task / label / "results.json").read_text())
            assert summary[task][label] == res["metrics"]["test_top1"]  # the table reports the run's own number
            assert 0 <= res["metrics"]["test_top1"] <= 100
            assert f"| {task} | {label} | {res['metrics']['test_top1']:.2f} | {res['tuned_params']:,} |" in printed
    png = (out / "selection_ratio.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # an interrupted or repeated demo reuses finished runs instead of failing or redoing them
    stamp = (out / TASKS[0] / "linear" / "results.json").stat().st_mtime
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert (out / TASKS[0] / "linear" / "results.json").stat().st_mtime == stamp
