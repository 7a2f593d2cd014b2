"""Which epoch a run reports (issue 25): tiny real runs trained with a test pass every epoch, so
metrics.jsonl holds every epoch's val and test top-1; the expected numbers are read from those
lines here, never from the code under test.

- a final run whose val is inside its training data (folder format, data.final=true: train + val)
  reports the last epoch, and its tuned file holds the last state;
- a run with held-out val reports its best-val epoch, and keeps the last epoch's test beside it;
- `gapt report` on plain `gapt train` runs reports them (they are no sweep trials), at the last
  epoch by default and at the best held-out-val epoch with --select best-val.
"""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gapt.cli import main

from test_engine import TINY


def make_noisy(root: Path, per_class=8, classes=4, signal=12) -> Path:
    """A hard folder dataset (the class is a faint colour cast on noise), so scores move between epochs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 200, (40, 40, 3), dtype=np.uint8)
            img[..., c % 3] += signal
            Image.fromarray(img).save(root / f"k{c}" / f"{i}.png")
    return root


def lines(run: Path):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def best_val_epoch(ls) -> int:
    """The first epoch with the highest val top-1 (1-based), from metrics.jsonl."""
    vals = [r["val_top1"] for r in ls]
    return vals.index(max(vals)) + 1


def train(run: Path, data: Path, *extra) -> dict:
    assert main(["train", *TINY, "train.epochs=4", "data.format=folder", f"data.root={data}",
                 "train.eval_test_every_epoch=true", f"out={run}", *extra]) == 0
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return make_noisy(tmp_path_factory.mktemp("data") / "noisy")


def test_final_run_without_held_out_val_reports_the_last_epoch(tmp_path, noisy, capsys):
    # find a run where choosing the epoch by val would report another test score than the last epoch's,
    # so that this test fails for any code that selects by val
    for lr in ("0.5", "2.0", "1.0", "0.25"):
        run = tmp_path / f"final-lr{lr}"
        res = train(run, noisy, "data.final=true", f"train.lr={lr}")
        ls = lines(run)
        if ls[best_val_epoch(ls) - 1]["test_top1"] != ls[-1]["test_top1"]:
            break
    else:
        pytest.fail("no lr gave a run whose best-val epoch has another test score than the last one")
    assert res["val_held_out"] is False and res["final"] is True
    m = res["metrics"]
    assert m["test_top1"] == pytest.approx(ls[-1]["test_top1"])  # the last epoch, whatever val says
    assert m["test_top1_last"] == pytest.approx(ls[-1]["test_top1"])
    assert (m["selection"], m["selected_epoch"]) == ("last", 4) and len(ls) == 4
    # no val score, no best-val epoch: val is part of the training data
    assert "val_top1_best" not in m and "best_epoch" not in m and "test_top1_best_val" not in m
    # the tuned file holds the last state: gapt eval gives the last epoch's test top-1
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(ls[-1]["test_top1"])
    # and gapt report shows the last epoch under either selection (there is no held-out val to select by)
    for select in ("last", "best-val"):
        out = tmp_path / f"rep-{select}"
        assert main(["report", str(run), "--out", str(out), "--select", select]) == 0
        row = next(r for r in csv.DictReader(io.StringIO((out / "report.csv").read_text())) if r["section"] == "task")
        assert float(row["mean"]) == pytest.approx(ls[-1]["test_top1"], abs=1e-4) and row["n_seeds"] == "1"


def test_held_out_run_reports_best_val_and_keeps_the_last(tmp_path, noisy):
    run = tmp_path / "trial"
    res = train(run, noisy, "train.lr=0.5")
    ls = lines(run)
    m, best = res["metrics"], best_val_epoch(ls)
    assert res["val_held_out"] is True and m["selection"] == "best-val"
    assert (m["best_epoch"], m["selected_epoch"]) == (best, best)
    assert m["val_top1_best"] == pytest.approx(ls[best - 1]["val_top1"])
    assert m["test_top1"] == pytest.approx(ls[best - 1]["test_top1"])
    assert m["test_top1_best_val"] == pytest.approx(ls[best - 1]["test_top1"])
    assert m["test_top1_last"] == pytest.approx(ls[-1]["test_top1"])


def test_report_on_plain_train_runs_reports_them_at_the_chosen_epoch(tmp_path, noisy, capsys):
    """Issue 25: `gapt report RUN1 RUN2` on two plain runs said "no runs to report (2 sweep trial(s) left out)"."""
    runs = [tmp_path / "runs" / f"seed{s}" for s in (1, 2)]
    for run, seed in zip(runs, (1, 2)):
        res = train(run, noisy, "train.lr=0.5", f"train.seed={seed}")
        assert res["final"] is False  # data.final=false, the default: still no sweep trial
    ls = [lines(r) for r in runs]
    last = sum(x[-1]["test_top1"] for x in ls) / 2
    at_best = sum(x[best_val_epoch(x) - 1]["test_top1"] for x in ls) / 2
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "no runs" not in captured.err and "trial(s) left out" not in captured.out
    rows = [r for r in csv.DictReader(io.StringIO((tmp_path / "rep" / "report.csv").read_text()))
            if r["section"] == "task"]
    assert len(rows) == 1 and rows[0]["n_seeds"] == "2" and rows[0]["seeds"] == "1 2"
    assert float(rows[0]["mean"]) == pytest.approx(last, abs=1e-4) and rows[0]["select"] == "last"
    assert "data.final=false" in rows[0]["settings"] and "trial" not in rows[0]["settings"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "last epoch" in md
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep-bv"), "--select", "best-val"]) == 0
    row = next(r for r in csv.DictReader(io.StringIO((tmp_path / "rep-bv" / "report.csv").read_text()))
               if r["section"] == "task")
    assert float(row["mean"]) == pytest.approx(at_best, abs=1e-4) and row["select"] == "best-val"
    assert float(row["mean_last_epoch"]) == pytest.approx(last, abs=1e-4)
    assert "best-val" in (tmp_path / "rep-bv" / "report.md").read_text()
