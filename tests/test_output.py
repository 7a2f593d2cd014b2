"""What the command line prints: cache steps in words (one line each), warnings as one log line,
`eval --split` reading one split, `predict --skip-bad`."""
import json
import logging

import pytest

from gapt.cli import main
from gapt.config import DataConfig
from gapt.data import build_datasets

from test_engine import TINY, make_folder_dataset


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "colours"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        make_folder_dataset(root / split, per_class=n)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, split_data):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "train.epochs=1", "data.format=folder", f"data.root={split_data}",
                 f"out={out}"]) == 0
    return out


def test_cache_steps_are_one_line_each_in_words(split_data, caplog):
    with caplog.at_level(logging.INFO, logger="gapt.data"):
        build_datasets(DataConfig(format="folder", root=str(split_data), num_workers=0), image_size=32)
    said = [r.getMessage() for r in caplog.records]
    steps = [line for line in said if "images in" in line]
    assert len(steps) == 3, said  # train checked, val and test cached: one line each
    assert sum(line.startswith("checked that the train split (train/) decodes") for line in steps) == 1
    assert sum(line.startswith("cached the val split (val/) in memory") for line in steps) == 1
    assert sum(line.startswith("cached the test split (test/) in memory") for line in steps) == 1
    assert not any("folder-" in line or "..." in line for line in said)  # no internal cache keys


def test_eval_of_one_split_reads_only_that_split(run, split_data, capsys, caplog):
    bad = split_data / "train" / "red" / "0.png"
    kept = bad.read_bytes()
    bad.write_bytes(b"not an image")  # train is broken now: eval --split test must not care
    try:
        with caplog.at_level(logging.INFO, logger="gapt"):
            assert main(["eval", str(run), "--split", "test", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["count"] == 6
        said = " | ".join(r.getMessage() for r in caplog.records)
        assert "the test split" in said and "the train split" not in said and "the val split" not in said
        assert main(["eval", str(run), "--split", "train"]) == 1
        assert "cannot read image" in capsys.readouterr().err
    finally:
        bad.write_bytes(kept)


def test_warnings_are_one_log_line_without_source(run, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="gapt"):
        assert main(["eval", str(run), "--split", "val"]) == 0
    err = capsys.readouterr().err
    assert "UserWarning" not in err and ".py:" not in err
    warned = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert warned == ["warning: backbone 'test_mae_tiny' built with random weights (weights=None)"]


def test_predict_skip_bad(run, split_data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = split_data / "test" / "green" / "0.png"
    (folder / "a.png").write_bytes(good.read_bytes())
    (folder / "b.png").write_bytes(b"broken")
    (folder / "c.png").write_bytes(good.read_bytes())
    assert main(["predict", str(run), str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read image {folder / 'b.png'}" in err and "--skip-bad" in err
    assert main(["predict", str(run), str(folder), "--skip-bad", "--json", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    preds = {p["image"]: p for p in json.loads(captured.out)}
    assert set(preds) == {str(folder / n) for n in ("a.png", "b.png", "c.png")}
    assert preds[str(folder / "b.png")]["top"] == [] and "UnidentifiedImageError" in preds[str(folder / "b.png")]["error"]
    assert preds[str(folder / "a.png")]["top"] == preds[str(folder / "c.png")]["top"]  # same image, same answer
    assert "skipped 1 unreadable image(s)" in captured.err and f"{folder / 'b.png'}: " in captured.err
