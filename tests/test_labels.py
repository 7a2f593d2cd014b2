"""Data that would silently change the task: label gaps warn, data.num_classes bounds labels,
a single class is an error."""
import logging

import pytest

from gapt.cli import main
from gapt.data import DataError, build_datasets
from gapt.data.folder import label_gaps

from test_data import cfg, make_folder

S = 16


def test_label_gaps_are_written_as_runs():
    assert label_gaps({0, 1, 2, 7}, 8) == "3..6"
    assert label_gaps({0, 2, 5}, 7) == "1, 3..4, 6"
    assert label_gaps({0, 1}, 2) == ""


def test_one_stray_label_warns_and_num_classes_makes_it_an_error(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4, ext="png")
    rows = [f"{c}/{i:03d}.png,{y}" for y, c in enumerate("abc") for i in range(4)]
    rows[5] = "b/001.png,7"  # a typo: 7 in a 3-class list (line 6)
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="gapt.data"):
        b = build_datasets(cfg(format="csv", root=str(root), csv_train="train.csv"), image_size=S)
    assert b.num_classes == 8
    warned = [r.getMessage() for r in caplog.records if "never occur" in r.getMessage()]
    assert len(warned) == 1 and "labels 3..6 never occur" in warned[0]
    with pytest.raises(DataError, match=r"train\.csv line 6: label 7 outside \[0, data\.num_classes=3\)"):
        build_datasets(cfg(format="csv", root=str(root), csv_train="train.csv", num_classes=3), image_size=S)
    rows[5] = "b/001.png,1"
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gapt.data"):
        b = build_datasets(cfg(format="csv", root=str(root), csv_train="train.csv", num_classes=3), image_size=S)
    assert b.num_classes == 3 and not [r for r in caplog.records if "never occur" in r.getMessage()]
    # num_classes above the labels found: the unused ones are named too
    b = build_datasets(cfg(format="csv", root=str(root), csv_train="train.csv", num_classes=5), image_size=S)
    assert b.num_classes == 5


def test_num_classes_must_match_a_folder(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("a", "b"), per_class=4, ext="png")
    with pytest.raises(DataError, match="data.num_classes=3 but .* has 2 classes"):
        build_datasets(cfg(format="folder", root=str(root), num_classes=3), image_size=S)


def test_a_single_class_is_an_error(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", classes=("only",), per_class=6, ext="png")
    with pytest.raises(DataError, match=r"has a single class \(only\): classification needs at least 2"):
        build_datasets(cfg(format="folder", root=str(root)), image_size=S)
    (root / "l.csv").write_text("".join(f"only/{i:03d}.png,0\n" for i in range(6)))
    with pytest.raises(DataError, match="single class"):
        build_datasets(cfg(format="csv", root=str(root), csv_train="l.csv"), image_size=S)
    assert main(["train", "backbone=test_mae_tiny", "weights=null", "image_size=32", "device=cpu",
                 "data.format=folder", f"data.root={root}", f"out={tmp_path / 'run'}"]) == 1
    assert "single class" in capsys.readouterr().err
