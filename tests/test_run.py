"""The run lifecycle both loops share (gapt.engine.run), the method-settings dataclass and the one
"same run" check: each against what the run folder, the model or the config must then hold."""
import math
import warnings

import pytest
import torch

from gapt import config as C
from gapt.engine import runfolder as rf
from gapt.engine.run import Run, TrainingDiverged, check_finite, config_for_resume
from gapt.method import METHODS, MethodSettings
from gapt.model.tuned import read_tuned_metadata

CPU = torch.device("cpu")


def cfg_at(out, *over):
    return C.load_config(None, ["backbone=test_mae_tiny", "weights=null", "image_size=32", f"out={out}", *over])


def test_opening_a_run_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    Run(cfg_at(out, "train.lr=0.5"), CPU)
    assert C.load_config(str(out / rf.CONFIG)).train.lr == 0.5
    assert (out / rf.METRICS).read_text() == ""
    rf.atomic_torch_save({"epoch": 0}, out / rf.RESUME)
    with pytest.raises(rf.RunFolderError, match="gapt seg train --resume"):
        Run(cfg_at(out), CPU, command="gapt seg train")  # a fresh start never overwrites a run
    rf.append_metrics(out, {"epoch": 1})
    rf.append_metrics(out, {"epoch": 2})
    run = Run(cfg_at(out, "device=cpu"), CPU, resume=True)  # resume: config.yaml rewritten, metrics kept
    assert C.load_config(str(out / rf.CONFIG)).device == "cpu" and len(rf.read_metrics(out)) == 2
    run.keep_metrics(lambda r: r["epoch"] < 2)
    assert rf.read_metrics(out) == [{"epoch": 1}]
    import gapt.engine.distributed as dist
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(C.ConfigError, match="train.batch_size"):
        Run(cfg_at(tmp_path / "other", "train.batch_size=8"), CPU)
    assert not (tmp_path / "other").exists()  # nothing written for a config that cannot run


def test_resume_state_carries_the_rng(tmp_path):
    run = Run(cfg_at(tmp_path / "run"), CPU)
    torch.manual_seed(3)
    run.save_state({"iteration": 7})
    expected = torch.rand(4)
    torch.manual_seed(99)
    state = run.load_state()
    assert state["iteration"] == 7
    torch.testing.assert_close(torch.rand(4), expected)  # the stream goes on where it was saved
    assert config_for_resume(str(tmp_path / "run")).out == str(tmp_path / "run")


def test_non_finite_check_names_the_step_and_what_is_kept(tmp_path):
    check_finite([1.0, 2.0], ["a", "b"], CPU, None, "kept {path}", "nothing kept")
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at epoch 2 step 1; stopped. nothing kept; a lower"):
        check_finite([1.0, math.nan], ["epoch 2 step 0", "epoch 2 step 1"], CPU, tmp_path / rf.RESUME,
                     "kept {path}", "nothing kept")
    (tmp_path / rf.RESUME).write_bytes(b"")
    with pytest.raises(TrainingDiverged, match=f"loss is inf at iteration 4; stopped. kept {tmp_path / rf.RESUME}"):
        check_finite([math.inf], ["iteration 4"], CPU, tmp_path / rf.RESUME, "kept {path}", "nothing kept")


def test_one_method_settings_for_config_model_and_tuned_file(tmp_path):
    from gapt import build_model, load_model
    assert MethodSettings().gate_init == C.RunConfig().gate_init == 10.0  # one default
    assert C.CHOICES["method"] == list(METHODS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = build_model("test_mae_tiny", num_classes=3, num_prompts=2)
        assert float(plain.gate_logits[0]) == -10.0
        cfg = cfg_at(tmp_path, "num_prompts=3", "gate_init=2", "learn_temperature=true", "prompt_dropout=0.2")
        model = build_model("test_mae_tiny", MethodSettings.of(cfg), num_classes=3)
    assert (model.num_prompts, model.gate_init, model.learn_temperature, model.prompt_dropout.p) == (3, 2.0, True, 0.2)
    assert model.pooling == "mean"  # "" resolved to the backbone's rule
    model.save_tuned(str(tmp_path / "t.safetensors"))
    meta = read_tuned_metadata(str(tmp_path / "t.safetensors"))
    assert {k: meta[k] for k in MethodSettings.names()} == {**MethodSettings.of(cfg).as_dict(), "pooling": "mean"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_model(str(tmp_path / "t.safetensors"))
    assert again.settings == model.settings
    with pytest.raises(TypeError, match="gate_inti"):
        build_model("test_mae_tiny", gate_inti=3)  # a misspelt setting is an error, not a silent default


def test_same_run_ignores_only_where_and_how_fast(tmp_path):
    a = cfg_at(tmp_path / "a")
    assert C.same_run(a, cfg_at(tmp_path / "b", "device=cpu", "data.num_workers=7", "weights=/moved/mae.pth",
                                "data.root=/elsewhere", "train.eval_batch_size=3", "data.cache=none"))
    assert C.run_differences(a, cfg_at(tmp_path / "a", "train.lr=0.3", "gate_init=1")) == {
        "train.lr": (0.1, 0.3), "gate_init": (10.0, 1.0)}
    assert not C.same_run(a, cfg_at(tmp_path / "a", "train.seed=1"))
    assert C.run_differences(a, cfg_at(tmp_path / "a", "train.seed=1"), free_keys=("out", "train.seed")) == {}


def test_segmentation_builds_its_random_backbone_from_train_seed(tmp_path):
    """One way to seed a random backbone (classification's): train.seed, whatever the global RNG."""
    from gapt.engine.trainer import model_from_config
    from gapt.seg.model import build_seg_model
    cfg = cfg_at(tmp_path, "seg.crop_size=32", "train.seed=5")
    torch.manual_seed(0)
    first = build_seg_model(cfg, 3, channels=8).encoder.backbone.state_dict()
    torch.manual_seed(1)
    second = build_seg_model(cfg, 3, channels=8).encoder.backbone.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classification = model_from_config(cfg, 3).backbone.state_dict()
    for k, v in first.items():  # image_size = crop_size here: the very same backbone
        torch.testing.assert_close(second[k], v)
        torch.testing.assert_close(classification[k], v)
