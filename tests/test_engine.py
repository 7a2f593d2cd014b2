"""The training engine and CLI: train -> eval -> predict, resume after a kill, DDP, schedules, errors."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gapt.cli import main
from gapt.config import ConfigError, load_config
from gapt.engine.schedule import LRSchedule
from gapt.engine.run import TrainingDiverged
from gapt.engine.trainer import train

TINY = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "data.num_workers=0",
        "device=cpu", "train.batch_size=8", "train.warmup_epochs=1"]
REPO = Path(__file__).resolve().parents[1]


def make_folder_dataset(root: Path, per_class: int = 8, classes=("red", "green", "blue")) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            img[..., c] += 150  # the class is the dominant colour
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def metrics_without_timing(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s",)} for r in rows]


def test_cli_train_eval_predict_cycle(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "colours")
    run = tmp_path / "run"
    assert main(["train", *TINY, "method=gated", "learn_temperature=true", "train.epochs=3", "train.lr=0.5",
                 "data.format=folder", f"data.root={data}", f"out={run}"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "results.json", "tuned.safetensors", "last.pt"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["benchmark"] == "folder" and results["method"] == "gated" and results["final"] is False
    m = results["metrics"]
    assert set(m) >= {"val_top1_best", "best_epoch", "test_top1", "test_top1_last"}
    lines = metrics_without_timing(run)
    assert [r["epoch"] for r in lines] == [1, 2, 3]  # epochs count from 1 in files and logs
    assert m["val_top1_best"] == max(r["val_top1"] for r in lines)
    assert m["best_epoch"] == [r["val_top1"] for r in lines].index(m["val_top1_best"]) + 1
    assert set(results["data"]) >= {"resize", "normalisation", "source"}
    # the tuned file holds only prompts, gates, temperatures and head
    assert set(load_file(run / "tuned.safetensors")) == {"prompt_embeddings", "gate_logits", "temperature",
                                                         "head.weight", "head.bias"}
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["split"] == "test" and ev["top1"] == pytest.approx(m["test_top1"])  # best-val state, same number
    img = next((data / "green").iterdir())
    assert main(["predict", str(run), str(img), "--top-k", "2", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    top = pred[0]["top"]
    assert len(top) == 2 and {t["class"] for t in top} <= {"red", "green", "blue"}
    assert top[0]["probability"] >= top[1]["probability"] and sum(t["probability"] for t in top) <= 1 + 1e-6
    # a folder means every image in it; batches of 5 give the same answers as one at a time
    assert main(["predict", str(run), str(data / "green"), str(img), "--batch-size", "5", "--json"]) == 0
    many = json.loads(capsys.readouterr().out)
    greens = sorted(str(p) for p in (data / "green").iterdir())
    assert [p["image"] for p in many] == greens + [str(img)]
    for p in many[:3]:
        assert main(["predict", str(run), p["image"], "--json"]) == 0
        single = json.loads(capsys.readouterr().out)[0]["top"]
        assert [t["class"] for t in single] == [t["class"] for t in p["top"]]
        assert [t["probability"] for t in single] == pytest.approx([t["probability"] for t in p["top"]], abs=1e-5)
    # a run moved to another machine: the dataset elsewhere, the device given
    moved = data.rename(tmp_path / "moved")
    assert main(["eval", str(run), "--json"]) == 1
    assert "colours" in capsys.readouterr().err  # names the missing folder
    assert main(["eval", str(run), "--json", "--data-root", str(moved), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(m["test_top1"])
    assert main(["predict", str(run), str(moved / "green"), "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(greens)
    data = moved
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(run), str(empty)]) == 1
    assert f"no images in folder {empty}" in capsys.readouterr().err
    # a second train into the same folder is refused, not silently overwritten
    assert main(["train", *TINY, "data.format=folder", f"data.root={data}", f"out={run}"]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_resume_after_stop_gives_uninterrupted_metrics(tmp_path):
    data = make_folder_dataset(tmp_path / "colours")  # augmented data and prompt dropout: RNG state matters
    over = [*TINY, "method=vpt-deep", "train.epochs=3", "train.lr=0.3", "prompt_dropout=0.2", "data.format=folder",
            f"data.root={data}"]
    full = train(load_config(None, over + [f"out={tmp_path / 'full'}"]))
    cfg = load_config(None, over + [f"out={tmp_path / 'cut'}"])
    assert train(cfg, stop_after_epoch=0) == {"stopped_after_epoch": 0}
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = train(cfg, resume=True)
    assert metrics_without_timing(tmp_path / "cut") == metrics_without_timing(tmp_path / "full")
    assert resumed["metrics"] == full["metrics"]
    a, b = load_file(tmp_path / "full" / "tuned.safetensors"), load_file(tmp_path / "cut" / "tuned.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill(tmp_path):
    """A real kill -9 mid-run, then `gapt train --resume`: same metrics as an uninterrupted run."""
    over = ["backbone=mae_vit_micro", "weights=null", "image_size=32", "num_prompts=2", "method=gated",
            "data.format=shapes", "data.name=count", "data.num_samples=64", "data.num_workers=0", "device=cpu",
            "train.batch_size=16", "train.epochs=6", "train.warmup_epochs=1", "train.lr=0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gapt", "train", *over]
    subprocess.run(cmd + [f"out={tmp_path / 'full'}"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [f"out={tmp_path / 'cut'}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resume_file = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while not resume_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "gapt", "train", "--resume", str(tmp_path / "cut")], check=True, env=env,
                   capture_output=True)
    assert metrics_without_timing(tmp_path / "cut") == metrics_without_timing(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "results.json").read_text())["metrics"]
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())["metrics"]
    assert full == cut


def test_test_split_runs_once_when_the_last_epoch_is_the_best(tmp_path, evaluate_descs):
    calls = evaluate_descs
    over = [*TINY, "method=vpt-shallow", "data.format=shapes", "data.name=count", "data.num_samples=48"]
    one = train(load_config(None, over + ["train.epochs=1", f"out={tmp_path / 'one'}"]))
    assert [c for c in calls if c.startswith("test")] == ["test (last)"]
    assert one["metrics"]["test_top1"] == one["metrics"]["test_top1_last"]
    calls.clear()  # lr ~0: val cannot rise, so epoch 0 stays the best and the last state is another one
    two = train(load_config(None, over + ["train.epochs=2", "train.lr=1e-12", f"out={tmp_path / 'two'}"]))
    assert [c for c in calls if c.startswith("test")] == ["test (last)", "test (best val)"]
    assert two["metrics"]["best_epoch"] == 1


def test_interrupt_says_what_is_saved_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from gapt.engine import runfolder as rf
    from gapt.engine import trainer as T
    run = tmp_path / "run"

    def interrupted_train(cfg, resume=False, epochs_done=0):
        if epochs_done:
            rf.atomic_torch_save({"epoch": epochs_done - 1, "tuned": {}}, Path(cfg.out) / rf.RESUME)
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "train", interrupted_train)
    assert main(["train", *TINY, "data.format=shapes", f"out={run}"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; nothing to resume in {run}" in err and err.count("interrupted") == 1
    run.mkdir()
    monkeypatch.setattr(T, "train", lambda cfg, resume=False: interrupted_train(cfg, resume, epochs_done=3))
    assert main(["train", *TINY, "data.format=shapes", f"out={run}"]) == 130
    assert (f"the state after 3 finished epoch(s) is saved; continue with `gapt train --resume {run}`"
            in capsys.readouterr().err)
    rf.atomic_torch_save({"iteration": 400, "tuned": {}}, run / rf.RESUME)
    assert rf.resume_hint(run, "gapt seg train") == (f"the state after 400 iterations is saved; continue with "
                                                     f"`gapt seg train --resume {run}`")


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    data = make_folder_dataset(tmp_path / "colours")
    cfg = load_config(None, [*TINY, "method=vpt-shallow", "train.epochs=2", "train.warmup_epochs=0",
                             "train.lr=1e38", "data.format=folder", f"data.root={data}", f"out={tmp_path / 'run'}"])
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at epoch 1 step \d+; stopped. No epoch had finished"):
        train(cfg)
    assert not (tmp_path / "run" / "results.json").exists()


def test_lazy_loss_reads_keep_metrics_and_the_failing_step(tmp_path, monkeypatch):
    """On CUDA the loss is read on the host every few steps; the epoch's numbers and the step
    named on divergence must not change (here forced on CPU: every 3 steps)."""
    from gapt.engine import trainer as T
    data = make_folder_dataset(tmp_path / "colours")
    over = [*TINY, "method=vpt-shallow", "train.epochs=2", "train.batch_size=2", "data.format=folder",
            f"data.root={data}"]
    diverging = [*over, "train.warmup_epochs=0", "train.lr=1e38"]
    runs = []
    for interval in (1, 3):
        monkeypatch.setattr(T, "loss_sync_interval", lambda device: interval)
        res = train(load_config(None, over + [f"out={tmp_path / f'ok{interval}'}"]))
        with pytest.raises(TrainingDiverged) as e:
            train(load_config(None, diverging + [f"out={tmp_path / f'nan{interval}'}"]))
        runs.append((res["metrics"], metrics_without_timing(tmp_path / f"ok{interval}"), str(e.value).split(".")[0]))
    assert runs[0] == runs[1]
    assert re.search(r"at epoch 1 step [1-9]\d*; stopped", runs[0][2])  # not the first step: a later one


def test_linear_probe_trains_on_cached_features(tmp_path, caplog):
    cfg = load_config(None, [*TINY, "method=linear", "train.epochs=2", "data.format=shapes", "data.name=count",
                             "data.num_samples=64", f"out={tmp_path / 'lin'}"])
    with caplog.at_level("INFO", logger="gapt"):
        res = train(cfg)
    assert "cached the output of 4 frozen block(s)" in caplog.text
    assert res["tuned_params"] == 32 * 6 + 6


def _train_losses(tmp_path, name, *extra):
    cfg = load_config(None, [*TINY, "method=gated", "learn_temperature=true", "train.epochs=2", "train.lr=0.3",
                             "data.format=shapes", "data.name=count", "data.num_samples=48", f"out={tmp_path / name}",
                             *extra])
    res = train(cfg)
    return res, [r["loss"] for r in metrics_without_timing(tmp_path / name)]


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    """train.precision=bf16 (the GPU default) runs on CPU too: recorded, and the losses follow fp32's."""
    fp32, fp32_losses = _train_losses(tmp_path, "fp32")
    bf16, bf16_losses = _train_losses(tmp_path, "bf16", "train.precision=bf16")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert bf16_losses != fp32_losses  # it really ran in bf16
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)


def test_torch_compile_trains_like_eager(tmp_path):
    """train.compile=true (inductor; a C++ compiler on CPU): same losses and metrics as eager to float tolerance."""
    # prompt dropout off: inductor draws its random numbers differently from eager
    eager, eager_losses = _train_losses(tmp_path, "eager", "prompt_dropout=0")
    compiled, compiled_losses = _train_losses(tmp_path, "compiled", "prompt_dropout=0", "train.compile=true")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert compiled["metrics"]["val_top1_best"] == eager["metrics"]["val_top1_best"]


@pytest.mark.parametrize("mode", ["cosine", "cosine_epoch"])
def test_schedules(mode):
    s = LRSchedule(1.0, epochs=100, warmup_epochs=10, steps_per_epoch=5, mode=mode)
    if mode == "cosine_epoch":  # the reference: epoch 0 at lr 0, a step per epoch
        assert s.lr(0, 3) == 0.0 and s.lr(5, 0) == s.lr(5, 4) == 0.5
        assert s.lr(10, 0) == 1.0
        assert s.lr(55, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    else:
        assert s.lr(0, 0) == 0.0 and s.lr(0, 1) == pytest.approx(1 / 50)
        assert s.lr(10, 0) == 1.0
        assert s.lr(55, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * (275 - 50) / 450)))
    assert s.lr(99, 4) < 0.002


@pytest.mark.parametrize("setting, local_rank, expected", [("auto", "1", "cuda:1"), ("cuda", "3", "cuda:3"),
                                                            ("cuda", None, "cuda:0"), ("cuda:2", "1", "cuda:2")])
def test_each_torchrun_process_gets_its_own_gpu(monkeypatch, setting, local_rank, expected):
    """No GPU here: torch.cuda is faked, to check which device each process picks and makes current."""
    from gapt.engine.run import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    device = resolve_device(load_config(None, [f"device={setting}"]))
    assert str(device) == expected and current == [expected]


def test_version(capsys):
    import gapt
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gapt {gapt.__version__}"


def test_config_validation_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match="bad value for config key 'train.epochs'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="bad value for config key 'method': 'gpt'"):
        load_config(None, ["method=gpt"])
    with pytest.raises(ConfigError, match="bad value for config key 'train.lr': -1"):
        load_config(None, ["train.lr=-1"])
    (tmp_path / "c.yaml").write_text("train:\n  bath_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.bath_size' in .*c.yaml \(did you mean "
                                          r"'train.batch_size'\?\)"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    assert main(["train", "data.fromat=fgvc"]) == 1
    assert "did you mean 'data.format'" in capsys.readouterr().err


def test_every_preset_loads():
    presets = sorted((REPO / "gapt" / "configs").glob("*/*/*.yaml"))
    assert len([p for p in presets if "/fgvc/" in str(p)]) == 10
    assert len([p for p in presets if "/vtab/" in str(p)]) == 38
    for p in presets:
        cfg = load_config(str(p))
        assert cfg.backbone in ("mae_vitb16", "mocov3_vitb16")


DDP_SCRIPT = r"""
import sys, json
from gapt.config import load_config
from gapt.engine.trainer import train
cfg = load_config(None, sys.argv[2:] + ["out=" + sys.argv[1]])
train(cfg)
"""


def test_ddp_gloo_two_processes_match_one(tmp_path):
    over = ["backbone=mae_vit_micro", "weights=null", "image_size=32", "num_prompts=2", "method=gated",
            "learn_temperature=true", "prompt_dropout=0", "data.format=shapes", "data.name=count",
            "data.num_samples=64", "data.num_workers=0", "device=cpu", "train.batch_size=16", "train.epochs=2",
            "train.warmup_epochs=1", "train.lr=0.3"]
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), *over], check=True, env=env,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", str(script), str(tmp_path / "two"), *over], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2
    assert one["metrics"]["val_top1_best"] == two["metrics"]["val_top1_best"]
    assert one["metrics"]["test_count"] == two["metrics"]["test_count"]  # every test image counted once
    a, b = load_file(tmp_path / "one" / "tuned.safetensors"), load_file(tmp_path / "two" / "tuned.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    va = [r["val_top1"] for r in metrics_without_timing(tmp_path / "one")]
    vb = [r["val_top1"] for r in metrics_without_timing(tmp_path / "two")]
    assert va == vb


DDP_NAN_SCRIPT = r"""
import os, sys
import torch.nn.functional as F
from gapt.config import load_config
from gapt.engine.run import TrainingDiverged
from gapt.engine.trainer import train
if os.environ["RANK"] == "1":  # only this process sees a non-finite loss, at its third training step
    real, calls = F.cross_entropy, []
    def cross_entropy(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 3 else out
    F.cross_entropy = cross_entropy
try:
    train(load_config(None, sys.argv[2:] + ["out=" + sys.argv[1]]))
except TrainingDiverged as e:
    with open(sys.argv[1] + ".rank" + os.environ["RANK"], "w") as f:  # one file per process: no interleaving
        f.write(f"diverged: {e}")
    sys.exit(3)
"""


def test_ddp_divergence_in_one_process_stops_all_at_the_same_step(tmp_path):
    over = ["backbone=mae_vit_micro", "weights=null", "image_size=32", "num_prompts=2", "method=gated",
            "data.format=shapes", "data.name=count", "data.num_samples=64", "data.num_workers=0", "device=cpu",
            "train.batch_size=16", "train.epochs=2", "train.warmup_epochs=1", "train.lr=0.3"]
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_NAN_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29518", str(script), str(tmp_path / "run"), *over],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    said = [(tmp_path / f"run.rank{rank}").read_text() if (tmp_path / f"run.rank{rank}").exists() else out[-2000:]
            for rank in (0, 1)]
    assert said[1].startswith("diverged: loss is nan at epoch 1 step 2; stopped"), said[1]
    assert said[0].startswith("diverged: the loss is not finite in another process at epoch 1 step 2; stopped"), said[0]


def test_distributed_eval_counts_each_sample_once(tmp_path):
    """7 samples over 2 processes: shards 4 + 3, no padding."""
    from gapt.engine.distributed import ShardSampler
    import gapt.engine.distributed as d
    seen = []
    for r in range(2):
        d_rank, d_world = d.rank, d.world_size
        d.rank, d.world_size = (lambda r=r: r), (lambda: 2)
        try:
            seen.append(list(ShardSampler(7)))
        finally:
            d.rank, d.world_size = d_rank, d_world
    assert seen == [[0, 2, 4, 6], [1, 3, 5]]
