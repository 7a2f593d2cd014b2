"""Runs as a user meets them: epochs numbered from 1 everywhere, --resume on a finished or
missing run, and final runs that do not report a val score on data they trained on."""
import json
import logging
import re

import pytest

from gapt.cli import main
from gapt.engine import trainer as T

from test_engine import TINY, make_folder_dataset


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "colours", per_class=6)


def test_epochs_count_from_one_in_logs_files_and_messages(tmp_path, colours, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="gapt"):
        assert main(["train", *TINY, "train.epochs=2", "data.format=folder", f"data.root={colours}",
                     f"out={run}"]) == 0
    said = [r.getMessage() for r in caplog.records]
    epochs_said = {int(m) for line in said for m in re.findall(r"\bepoch (\d+)", line)}
    assert epochs_said <= {1, 2} and epochs_said, said  # never an "epoch 0"
    assert any(line.startswith("epoch 2/2 ") for line in said)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    results = json.loads((run / "results.json").read_text())
    best = results["metrics"]["best_epoch"]
    done = next(line for line in said if line.startswith("done:"))
    assert f"(epoch {best})" in done and best in (1, 2) and results["val_held_out"] is True


def test_resume_a_finished_run_says_so_and_force_eval_evaluates(tmp_path, colours, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.epochs=1", "data.format=folder", f"data.root={colours}",
                 f"out={run}"]) == 0
    calls = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda cfg, resume=False: calls.append(resume) or real(cfg, resume=resume))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"{run} is finished" in capsys.readouterr().err and calls == []  # no data scan, no test pass
    before = json.loads((run / "results.json").read_text())["metrics"]
    assert main(["train", "--resume", str(run), "--force-eval"]) == 0
    assert calls == [True]
    assert json.loads((run / "results.json").read_text())["metrics"] == before  # same state, same numbers


def test_resume_a_missing_folder(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'nope'} does not exist" in err and "resume file" not in err


def test_final_run_reports_no_val_score_on_data_it_trained_on(tmp_path, colours, caplog):
    run = tmp_path / "final"
    with caplog.at_level(logging.INFO, logger="gapt"):
        assert main(["train", *TINY, "train.epochs=1", "data.format=folder", "data.final=true",
                     f"data.root={colours}", f"out={run}"]) == 0
    said = [r.getMessage() for r in caplog.records]
    done = next(line for line in said if line.startswith("done"))
    assert "no held-out val" in done and "val top-1" not in done
    epoch_line = next(line for line in said if line.startswith("epoch 1/1 "))
    assert "val_top1" not in epoch_line
    assert json.loads((run / "results.json").read_text())["val_held_out"] is False
