"""Experiment tracking: TensorBoard event files and W&B offline runs read back and compared to
metrics.jsonl; a killed and resumed run continues its curves without repeated steps."""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gapt.config import ConfigError, load_config
from gapt.engine.runfolder import read_metrics
from gapt.engine.trainer import train

pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "data.num_workers=0",
          "device=cpu", "train.batch_size=16", "train.warmup_epochs=1", "data.format=shapes", "data.name=count",
          "data.num_samples=48", "train.lr=0.3"]


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def curve(acc: EventAccumulator, tag: str):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


def selection_ratios(gates):
    """r_l = g_l prod_{k>l} (1 - g_k), normalised (SPEC §2), written out with loops."""
    w = []
    for l, g in enumerate(gates):
        p = g
        for k in gates[l + 1:]:
            p *= 1 - k
        w.append(p)
    return [x / sum(w) for x in w]


def test_tensorboard_curves_equal_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    res = train(load_config(None, [*SHAPES, "method=gated", "learn_temperature=true", "train.epochs=2",
                                   "train.logger=tensorboard", f"out={run}"]))
    rows = read_metrics(run)
    acc = events(run / "tb")
    steps = [s for s, _ in curve(acc, "train/loss")]
    per_epoch = math.ceil(res["data"]["train_images"] / 16) if "train_images" in res["data"] else steps[0]
    assert steps == [per_epoch * r["epoch"] for r in rows]  # epochs count from 1
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_s", "images_per_s"),
                     ("val/top1", "val_top1"), ("val/loss", "val_loss")]:
        assert curve(acc, tag) == [(s, f32(r[key])) for s, r in zip(steps, rows)], tag
    # gates, selection ratios and temperatures of the last epoch: those of the last state in last.pt
    last = torch.load(run / "last.pt", weights_only=True)["tuned"]
    gates = last["gate_logits"].double().sigmoid().tolist()
    depth = len(gates) + 1
    assert sorted(t for t in acc.Tags()["scalars"] if t.startswith("gates/")) == sorted(
        f"gates/block_{l}" for l in range(1, depth))
    for l in range(1, depth):
        assert acc.Scalars(f"gates/block_{l}")[-1].value == pytest.approx(gates[l - 1], rel=1e-6)
        assert acc.Scalars(f"selection_ratio/block_{l}")[-1].value == pytest.approx(
            selection_ratios(gates)[l - 1], rel=1e-5)
    temps = last["temperature"].clamp(0.01, 10).tolist()
    for l in range(1, depth + 1):
        assert acc.Scalars(f"temperature/block_{l}")[-1].value == pytest.approx(temps[l - 1], rel=1e-6)
    # the test results at the end, and the resolved config as text
    assert curve(acc, "results/test_top1") == [(steps[-1], f32(res["metrics"]["test_top1"]))]
    assert curve(acc, "results/val_top1_best") == [(steps[-1], f32(res["metrics"]["val_top1_best"]))]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert (run / "config.yaml").read_text().strip() in text


def test_logger_none_writes_nothing_and_bad_value_is_named(tmp_path):
    train(load_config(None, [*SHAPES, "method=linear", "train.epochs=1", "train.logger=none", f"out={tmp_path / 'r'}"]))
    assert not (tmp_path / "r" / "tb").exists() and not (tmp_path / "r" / "wandb").exists()
    with pytest.raises(ConfigError, match="train.logger"):
        load_config(None, ["train.logger=mlflow"])


def test_segmentation_curves(tmp_path, monkeypatch):
    from test_seg_run import overrides, write_ade
    from gapt.seg import train as seg_train
    monkeypatch.setattr(seg_train, "HEAD_CHANNELS", 16)
    root = write_ade(tmp_path / "ade")
    out = tmp_path / "seg"
    seg_train.train_seg(load_config(None, overrides(root, out, **{"train.logger": "tensorboard",
                                                                   "learn_temperature": "true"})), log_every=1)
    rows = read_metrics(out)
    acc = events(out / "tb")
    assert curve(acc, "train/loss") == [(r["iteration"], f32(r["loss"])) for r in rows]
    evals = [r for r in rows if "mIoU" in r]
    assert [s for s, _ in curve(acc, "val/mIoU")] == [r["iteration"] for r in evals] == [2, 4]
    assert curve(acc, "val/mIoU") == [(r["iteration"], f32(r["mIoU"])) for r in evals]
    assert len(acc.Scalars("gates/block_1")) == len(rows) and "temperature/block_4" in acc.Tags()["scalars"]
    final = json.loads((out / "results.json").read_text())["metrics"]
    assert curve(acc, "results/mIoU") == [(4, f32(final["mIoU"]))]


# -- W&B ------------------------------------------------------------------------------------------------
def wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB log
    format (32 KiB blocks; per chunk crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pos, block, partial = [], 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            out.append(partial)
    return out


def proto_fields(buf: bytes):
    """Protocol-buffer wire format -> [(field, wire type, value)], or None if ``buf`` is not a message."""
    out, pos = [], 0

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(buf):
                raise ValueError
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result
    try:
        while pos < len(buf):
            key = varint()
            field, wire = key >> 3, key & 7
            if wire == 0:
                out.append((field, 0, varint()))
            elif wire == 2:
                n = varint()
                if pos + n > len(buf):
                    return None
                out.append((field, 2, buf[pos:pos + n]))
                pos += n
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                return None
    except ValueError:
        return None
    return out if pos == len(buf) else None


def key_values(buf: bytes, found=None):
    """Every (key, value_json) pair in a W&B record: an item message with key (field 2) and value_json (16)."""
    found = [] if found is None else found
    fields = proto_fields(buf) or []
    strings = {f: v for f, w, v in fields if w == 2}
    if 2 in strings and 16 in strings:
        found.append((strings[2].decode(), json.loads(strings[16])))
    for f, w, v in fields:
        if w == 2 and len(v) > 2:
            key_values(v, found)
    return found


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    res = train(load_config(None, [*SHAPES, "method=gated", "train.epochs=2", "train.logger=wandb", f"out={run}"]))
    run_id = (run / "wandb_run_id").read_text().strip()
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list((run / "wandb").rglob("*"))
    # the logged rows, keyed by W&B's own _step; its service process may still be writing the file
    deadline = time.time() + 30
    while True:
        logged = {}
        for record in wandb_records(files[0]):
            items = dict(key_values(record))
            if "_step" in items:
                logged.setdefault(items["_step"], {}).update(items)
        if any("results/test_top1" in v for v in logged.values()) or time.time() > deadline:
            break
        time.sleep(0.2)
    rows = read_metrics(run)
    per_epoch = sorted(logged)[0]
    assert sorted(logged) == [per_epoch * r["epoch"] for r in rows]
    for row in rows:
        got = logged[per_epoch * row["epoch"]]
        assert {t: got[t] for t in ("train/loss", "train/lr", "val/top1", "val/loss")} == {
            "train/loss": row["loss"], "train/lr": row["lr"], "val/top1": row["val_top1"], "val/loss": row["val_loss"]}
        assert {f"gates/block_{l}" for l in (1, 2, 3)} <= set(got)
    assert logged[per_epoch * 2]["results/test_top1"] == res["metrics"]["test_top1"]
    assert not (run / "tb").exists()


# -- kill and resume --------------------------------------------------------------------------------------
def test_killed_run_resumes_without_repeated_steps(tmp_path):
    over = ["backbone=mae_vit_micro", "weights=null", "image_size=32", "num_prompts=2", "method=gated",
            "data.format=shapes", "data.name=count", "data.num_samples=64", "data.num_workers=0", "device=cpu",
            "train.batch_size=16", "train.epochs=6", "train.warmup_epochs=1", "train.lr=0.2",
            "train.logger=tensorboard", f"out={tmp_path / 'cut'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gapt", "train", *over], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resume_file = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while not resume_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it go on into the next epoch, whose points the resumed run must replace
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "gapt", "train", "--resume", str(tmp_path / "cut")], check=True, env=env,
                   capture_output=True)
    assert len(list((tmp_path / "cut" / "tb").glob("events.out.tfevents.*"))) == 2  # killed + resumed process
    rows = read_metrics(tmp_path / "cut")
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    acc = events(tmp_path / "cut" / "tb")
    for tag, key in [("train/loss", "loss"), ("val/top1", "val_top1")]:
        points = curve(acc, tag)
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)) and len(steps) == 6, (tag, steps)
        assert [v for _, v in points] == [f32(r[key]) for r in rows], tag
    assert len(acc.Scalars("gates/block_1")) == 6


def test_points_written_after_the_resume_point_are_replaced(tmp_path):
    """A kill after an epoch's points but before its resume file: the resumed run writes that epoch
    again, and TensorBoard's reader shows each step once (purge_step), with the resumed values."""
    import shutil
    run = tmp_path / "run"
    cfg = load_config(None, [*SHAPES, "method=gated", "train.epochs=3", "train.logger=tensorboard", f"out={run}"])
    train(cfg, stop_after_epoch=0)
    shutil.copy(run / "last.pt", tmp_path / "after_epoch0.pt")
    train(cfg, resume=True, stop_after_epoch=1)   # epoch 1's points are written ...
    shutil.copy(tmp_path / "after_epoch0.pt", run / "last.pt")  # ... but its resume file is lost
    train(cfg, resume=True)
    raw = []  # every point in the files, purged or not
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        raw += [e.step for e in EventFileLoader(str(f)).Load() for v in e.summary.value if v.tag == "train/loss"]
    assert len(raw) == 4 and len(set(raw)) == 3  # epoch 1's step is in the files twice
    rows = read_metrics(run)
    assert [s for s, _ in curve(events(run / "tb"), "train/loss")] == sorted(set(raw))
    assert [v for _, v in curve(events(run / "tb"), "train/loss")] == [f32(r["loss"]) for r in rows]
