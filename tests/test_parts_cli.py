"""Every PEFT baseline (and a composition) through the command line: train, eval, the tuned file, load_model,
export (merged where every part folds, peft for LoRA), and resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import gapt
from gapt.cli import main
from gapt.config import load_config
from gapt.engine.inference import load_run
from gapt.engine.trainer import train
from test_engine import TINY, make_folder_dataset, metrics_without_timing


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("colours"))


@pytest.mark.parametrize("method,merges", [("lora", True), ("ssf", True), ("bitfit", True), ("adaptformer", False),
                                           ("gated+lora", False)])
def test_train_eval_load_and_export(tmp_path, data, method, merges, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"method={method}", "train.epochs=2", "train.lr=0.01", "train.optimizer=adamw",
                 "train.weight_decay=0.01", "data.format=folder", f"data.root={data}", f"out={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method
    assert sum(results["tuned_params_by_part"].values()) == results["tuned_params"]
    _, model, _ = load_run(str(run))
    assert set(load_file(run / "tuned.safetensors")) == set(model.tuned_parameters())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(results["metrics"]["test_top1"])
    images = torch.randn(2, 3, 32, 32)
    again = gapt.load_model(str(run / "tuned.safetensors"), random_seed=42).eval()
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(again(images), expected)
    merged_file = tmp_path / "merged.safetensors"
    if merges:
        assert main(["export", str(run), "--merged", str(merged_file)]) == 0
        merged = gapt.load_merged(str(merged_file))
        with torch.no_grad():
            assert ((merged(images) - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    else:
        assert main(["export", str(run), "--merged", str(merged_file)]) == 1
        err = capsys.readouterr().err
        assert "cannot be merged" in err and err.count("\n") == 1 and not merged_file.exists()
    if method == "lora":
        assert main(["export", str(run), "--peft", str(tmp_path / "adapter")]) == 0
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_adaptformer_resume_gives_the_uninterrupted_metrics(tmp_path, data):
    over = [*TINY, "method=adaptformer", "adapter_dim=8", "train.epochs=2", "train.lr=0.01", "train.optimizer=adamw",
            "data.format=folder", f"data.root={data}"]
    full = train(load_config(None, over + [f"out={tmp_path / 'full'}"]))
    cfg = load_config(None, over + [f"out={tmp_path / 'cut'}"])
    train(cfg, stop_after_epoch=0)
    resumed = train(cfg, resume=True)
    assert metrics_without_timing(tmp_path / "cut") == metrics_without_timing(tmp_path / "full")
    assert resumed["metrics"] == full["metrics"]
