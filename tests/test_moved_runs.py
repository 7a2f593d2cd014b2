"""A finished run whose backbone checkpoint moved: eval / predict / seg eval / seg predict take --weights."""
import json

import pytest
import torch

import gapt.seg.train as seg_train
from gapt.cli import main

from conftest import tiny_model
from test_engine import TINY, make_folder_dataset
from test_seg_run import overrides, write_ade


@pytest.fixture
def backbone_file(tmp_path):
    path = tmp_path / "ckpt" / "mae_tiny.pth"
    path.parent.mkdir()
    torch.save({"model": tiny_model(seed=5).backbone.state_dict()}, path)
    return path


def test_classification_run_with_moved_weights(tmp_path, backbone_file, capsys):
    data = make_folder_dataset(tmp_path / "colours", per_class=4)
    run = tmp_path / "run"
    tiny = [kv for kv in TINY if not kv.startswith("weights=")]
    assert main(["train", *tiny, f"weights={backbone_file}", "train.epochs=1", "data.format=folder",
                 f"data.root={data}", f"out={run}"]) == 0
    test_top1 = json.loads((run / "results.json").read_text())["metrics"]["test_top1"]
    moved = backbone_file.rename(tmp_path / "elsewhere.pth")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert str(backbone_file) in err and "--weights PATH" in err
    assert main(["eval", str(run), "--weights", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(test_top1)
    img = next((data / "red").iterdir())
    assert main(["predict", str(run), str(img)]) == 1
    assert "--weights PATH" in capsys.readouterr().err
    assert main(["predict", str(run), str(img), "--weights", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(img)


def test_seg_run_with_moved_weights(tmp_path, backbone_file, capsys, monkeypatch):
    monkeypatch.setattr(seg_train, "HEAD_CHANNELS", 16)
    ade = write_ade(tmp_path / "ade", n_train=2, n_val=1)
    run = tmp_path / "seg"
    assert main(["seg", "train", *overrides(ade, run, weights=str(backbone_file), **{"seg.iterations": 2,
                                                                                     "seg.eval_every": 0})]) == 0
    miou = json.loads((run / "results.json").read_text())["metrics"]["mIoU"]
    moved = backbone_file.rename(tmp_path / "elsewhere.pth")
    capsys.readouterr()
    assert main(["seg", "eval", str(run)]) == 1
    assert "--weights PATH" in capsys.readouterr().err
    assert main(["seg", "eval", str(run), "--weights", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(miou)
    img = next((ade / "images" / "validation").iterdir())
    assert main(["seg", "predict", str(run), str(img), "--out", str(tmp_path / "p")]) == 1
    assert "--weights PATH" in capsys.readouterr().err
    assert main(["seg", "predict", str(run), str(img), "--out", str(tmp_path / "p"), "--weights", str(moved)]) == 0
