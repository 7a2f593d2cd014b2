"""train.precision: fp32 is strict (TF32 off while a run lasts, switches restored after), bf16
autocasts and leaves the switches alone; every results.json records what ran. The TF32 switches
are read inside the runs (no GPU needed: they are process flags)."""
import json

import pytest
import torch

import gapt.engine.trainer as trainer
import gapt.seg.evaluate as seg_evaluate
import gapt.seg.train as seg_train
from gapt.config import load_config
import gapt.engine.inference as engine_inference
from gapt.engine.inference import eval_run
from gapt.engine.precision import precision_record, precision_scope, resolve_precision, tf32_active

from test_seg_run import overrides as seg_overrides
from test_seg_run import write_ade

TINY = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "data.num_workers=0",
        "device=cpu", "train.batch_size=8", "train.warmup_epochs=0", "train.epochs=1", "data.format=shapes",
        "data.name=count", "data.num_samples=16"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def switches():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def tf32_on():
    """The process starts with TF32 allowed everywhere (what a user's script or a library may set)."""
    saved = switches()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield (True, True, "high")
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]


def test_resolve_precision_table():
    assert [resolve_precision(s, CPU) for s in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert [resolve_precision(s, CUDA) for s in ("auto", "fp32", "bf16")] == ["bf16", "fp32", "bf16"]
    with pytest.raises(ValueError, match="train.precision.*fp16"):
        resolve_precision("fp16", CPU)


def test_scope_switches_tf32_off_for_fp32_only(tf32_on):
    assert tf32_active(CUDA) and not tf32_active(CPU)  # CPU has no TF32, whatever the flags
    with precision_scope("fp32", CUDA) as dtype:
        assert dtype is None and switches() == (False, False, "highest")
        assert precision_record("fp32", CUDA) == {"precision": "fp32", "precision_setting": "fp32", "tf32": False}
    assert switches() == tf32_on  # restored
    with precision_scope("auto", CUDA) as dtype:  # auto on a GPU = bf16: switches untouched
        assert dtype == torch.bfloat16 and switches() == tf32_on
        assert precision_record("auto", CUDA) == {"precision": "bf16", "precision_setting": "auto", "tf32": True}
    with pytest.raises(RuntimeError):
        with precision_scope("fp32", CPU):
            raise RuntimeError("a failing run")
    assert switches() == tf32_on  # restored after an error too


def _spy(monkeypatch, module, name, seen):
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(switches())
        return inner(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classification_run_precision(tmp_path, monkeypatch, tf32_on, precision):
    seen = []
    _spy(monkeypatch, trainer, "train_one_epoch", seen)
    _spy(monkeypatch, trainer, "evaluate", seen)
    res = trainer.train(load_config(None, [*TINY, f"train.precision={precision}", f"out={tmp_path / 'run'}"]))
    expected = (False, False, "highest") if precision == "fp32" else tf32_on
    assert seen and all(s == expected for s in seen)
    assert switches() == tf32_on
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in (res, saved):
        assert r["precision"] == precision and r["precision_setting"] == precision
        assert r["tf32"] is False  # a CPU run
        assert r["pos_embed_interpolation"] == "bicubic"
    seen.clear()
    _spy(monkeypatch, engine_inference, "evaluate", seen)
    out = eval_run(str(tmp_path / "run"), "val")  # eval runs at the run's precision too
    assert (out["precision"], out["tf32"]) == (precision, False)
    assert seen and all(s == expected for s in seen)


def test_segmentation_run_precision(tmp_path, monkeypatch, tf32_on):
    seen = []
    _spy(monkeypatch, seg_train, "seg_loss", seen)
    root = write_ade(tmp_path / "ade", n_train=2, n_val=1)
    with monkeypatch.context() as mp:
        mp.setattr(seg_train, "HEAD_CHANNELS", 8)
        cfg = load_config(None, seg_overrides(root, tmp_path / "run", **{"seg.iterations": 1, "seg.eval_every": 0,
                                                                           "train.precision": "fp32"}))
        res = seg_train.train_seg(cfg)
    assert seen and all(s == (False, False, "highest") for s in seen)
    assert switches() == tf32_on
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in (res, saved):
        assert (r["precision"], r["precision_setting"], r["tf32"]) == ("fp32", "fp32", False)
        assert r["pos_embed_interpolation"] == "bilinear"
    spied = []
    _spy(monkeypatch, seg_evaluate, "evaluate_seg", spied)
    with monkeypatch.context() as mp:
        mp.setattr(seg_train, "HEAD_CHANNELS", 8)
        out = seg_evaluate.eval_run(str(tmp_path / "run"))
    assert spied == [(False, False, "highest")] and switches() == tf32_on
    assert (out["precision"], out["tf32"]) == ("fp32", False)
    assert json.loads((tmp_path / "run" / "eval_val.json").read_text())["precision"] == "fp32"
