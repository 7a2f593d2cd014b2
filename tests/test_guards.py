"""Issue 11 item 5: tests that can catch a regression, each checked against something other than the
code under test (an independent run, SPEC's values kept here, counted calls, a killed process)."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gapt.cli import main
from gapt.config import load_config, warmup_epochs
from gapt.engine.trainer import train

TINY = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "train.batch_size=16",
        "data.format=shapes", "data.name=count", "data.num_samples=48", "data.num_workers=0", "device=cpu"]
REPO = Path(__file__).resolve().parents[1]


# -- linear probing on cached features ---------------------------------------------------------
def test_linear_probe_cached_equals_uncached(tmp_path, monkeypatch):
    over = [*TINY, "method=linear", "train.epochs=2", "train.lr=0.5"]
    cached = train(load_config(None, over + [f"out={tmp_path / 'cached'}"]))
    from gapt.model import PromptedViT
    monkeypatch.setattr(PromptedViT, "frozen_leading_blocks", property(lambda self: 0))  # no feature cache
    plain = train(load_config(None, over + [f"out={tmp_path / 'plain'}"]))
    assert cached["frozen_cache_blocks"] == 4 and plain["frozen_cache_blocks"] == 0
    a, b = load_file(tmp_path / "cached" / "tuned.safetensors"), load_file(tmp_path / "plain" / "tuned.safetensors")
    assert set(a) == set(b) == {"head.weight", "head.bias"}
    assert not torch.allclose(a["head.weight"], torch.zeros_like(a["head.weight"]))
    for k in a:  # same seed, same batches: the same head to float tolerance
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert cached["metrics"] == pytest.approx(plain["metrics"], abs=1e-4)


# -- presets against SPEC §5/§6, from a table kept here -----------------------------------------
FGVC = {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}
VTAB = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
        "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
        "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"]
# SPEC §6: SGD momentum 0.9, 100 epochs, 10 linear warm-up epochs, cosine, weight decay 0, batch 64 / 128;
# SPEC §5: the final run trains on train.json alone (FGVC) and on train800val200 (VTAB).
SPEC = {"fgvc": dict(batch=64, final_train="train.json"), "vtab": dict(batch=128, final_train="train800val200")}


def _stub_dataset(tmp_path, benchmark, name):
    """The smallest folder each format's reader accepts (split lists only; no image is opened)."""
    if benchmark == "fgvc":
        root = tmp_path / name
        image_dir = {"cub": "images", "nabirds": "images", "dogs": "Images"}.get(name, ".")
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            (root / f"{split}.json").write_text(json.dumps({"a.jpg": 0}))
        return root
    root = tmp_path / "vtab"
    (root / name).mkdir(parents=True)
    for split in ("train800", "val200", "train800val200", "test"):
        (root / name / f"{split}.txt").write_text("images/a.jpg 0\n")
    return root


@pytest.mark.parametrize("backbone", ["mae_vitb16", "mocov3_vitb16"])
def test_presets_follow_spec(backbone, tmp_path):
    from gapt.data.fgvc import parse_fgvc
    from gapt.data.vtab import parse_vtab
    import gapt
    presets = Path(gapt.__file__).parent / "configs"
    expected = [("fgvc", n) for n in FGVC] + [("vtab", t) for t in VTAB]
    found = sorted((p.parent.parent.name, p.stem) for p in presets.glob(f"*/{backbone}/*.yaml"))
    assert found == sorted(expected)
    for benchmark, name in expected:
        cfg = load_config(str(presets / benchmark / backbone / f"{name}.yaml"))
        t, where = cfg.train, f"{benchmark}/{backbone}/{name}"
        assert (cfg.backbone, cfg.data.format, cfg.data.name) == (backbone, benchmark, name), where
        assert (t.optimizer, t.momentum, t.epochs, warmup_epochs(t), t.schedule) == ("sgd", 0.9, 100, 10, "cosine"), where
        # Table 5 (SPEC §8) runs MoCo v3's oxford_iiit_pet and resisc45 at batch 64
        batch = 64 if (backbone, name) in {("mocov3_vitb16", "oxford_iiit_pet"), ("mocov3_vitb16", "resisc45")} \
            else SPEC[benchmark]["batch"]
        assert (t.weight_decay, t.batch_size, t.seed) == (0.0, batch, 42), where
        assert cfg.data.final is False, where  # the lr search selects on val; finals set data.final=true
        root = _stub_dataset(tmp_path / where.replace("/", "_"), benchmark, name)
        final = load_config(str(presets / benchmark / backbone / f"{name}.yaml"),
                            [f"data.root={root}", "data.final=true"])
        parse = parse_fgvc if benchmark == "fgvc" else parse_vtab
        assert parse(final.data).split_names["train"] == SPEC[benchmark]["final_train"], where


# -- the CLI -------------------------------------------------------------------------------------
KEY_DEFAULTS = {  # SPEC §6 and the README's defaults, kept here
    "backbone": "mae_vitb16", "method": "gated", "num_prompts": 100, "gate_init": 10.0, "prompt_dropout": 0.1,
    "image_size": 224, "learn_temperature": False, "data.format": "folder", "train.epochs": 100,
    "train.warmup_epochs": "auto", "train.lr": 0.1, "train.momentum": 0.9, "train.optimizer": "sgd",
    "train.weight_decay": 0.0, "train.seed": 42, "train.schedule": "cosine", "train.eval_test_every_epoch": False,
}


def test_gapt_keys_prints_every_key_with_a_usable_default(capsys):
    import ast
    from omegaconf import OmegaConf
    from gapt.config import RunConfig
    assert main(["keys"]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"^([\w.]+) = ('(?:[^'\\]|\\.)*'|\S+)", line)
        if m:
            assert m.group(1) not in printed, f"{m.group(1)} listed twice"
            printed[m.group(1)] = ast.literal_eval(m.group(2))

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from (leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    assert set(printed) == set(leaves(OmegaConf.to_container(OmegaConf.structured(RunConfig))))
    for key, value in KEY_DEFAULTS.items():
        assert printed[key] == value, key
    # every printed default is accepted back as an override and changes nothing
    as_text = {k: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in printed.items()}
    assert load_config(None, [f"{k}={v}" for k, v in as_text.items() if v != ""]) == load_config(None, [])


BACKBONES = {"mae_vitb16": (16, 768, 12), "mae_vitl16": (16, 1024, 24), "mae_vith14": (14, 1280, 32),
             "mocov3_vits16": (16, 384, 12), "mocov3_vitb16": (16, 768, 12), "dino_vitb16": (16, 768, 12)}


def test_gapt_backbones_lists_the_architectures(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name, (patch, width, depth) in BACKBONES.items():
        line = next((ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name), None)
        assert line is not None, name
        assert re.search(rf"patch {patch}\b", line) and re.search(rf"width {width}\b", line), line
        assert re.search(rf"depth {depth}\b", line), line
    assert "test_mae_tiny" not in out  # the test suite's own ViTs stay hidden


def test_adamw_applies_decoupled_weight_decay(tmp_path):
    """One AdamW step from the same start: p(wd) = p(0) - lr * wd * p_start, so the shifts for two decays
    are proportional (an L2 term inside Adam's normalisation, or a decay left out, is not)."""
    one_step = [*TINY, "method=gated", "learn_temperature=true", "train.epochs=1", "train.max_steps_per_epoch=1",
                "train.lr=0.05"]
    tuned = {}
    for name, extra in [("sgd", []), ("adamw0", ["train.optimizer=adamw"]),
                        ("adamw1", ["train.optimizer=adamw", "train.weight_decay=0.1"]),
                        ("adamw3", ["train.optimizer=adamw", "train.weight_decay=0.3"])]:
        assert main(["train", *one_step, *extra, f"out={tmp_path / name}"]) == 0
        tuned[name] = load_file(tmp_path / name / "tuned.safetensors")
    assert json.loads((tmp_path / "adamw3" / "results.json").read_text())["weight_decay"] == 0.3
    assert not torch.allclose(tuned["sgd"]["head.weight"], tuned["adamw0"]["head.weight"])
    for k in tuned["adamw0"]:
        d1, d3 = tuned["adamw1"][k] - tuned["adamw0"][k], tuned["adamw3"][k] - tuned["adamw0"][k]
        assert d1.abs().max() > 0, k
        assert torch.allclose(d3, 3 * d1, rtol=1e-3, atol=1e-7), k


def test_eval_test_every_epoch_counts_the_test_passes(tmp_path, evaluate_descs):
    descs = evaluate_descs
    run = tmp_path / "ref"
    assert main(["train", *TINY, "method=vpt-shallow", "train.epochs=3", "train.eval_test_every_epoch=true",
                 f"out={run}"]) == 0
    res = json.loads((run / "results.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tests = [d for d in descs if d.startswith("test")]
    once_more = 1 if res["metrics"]["best_epoch"] == 3 else 2  # 3 = last epoch (1-based)
    assert len(tests) == 3 + once_more and tests.count("test") == 3
    assert [("test_top1" in r) for r in lines] == [True, True, True]
    assert lines[-1]["test_top1"] == pytest.approx(res["metrics"]["test_top1_last"])  # the same state
    descs.clear()
    assert main(["train", *TINY, "method=vpt-shallow", "train.epochs=3", f"out={tmp_path / 'plain'}"]) == 0
    assert "test" not in descs and len([d for d in descs if d.startswith("test")]) in (1, 2)


def test_report_only_final_flag(tmp_path, capsys):
    from test_report import top1, write_run
    root = tmp_path / "runs"
    write_run(root, "final/cub", task="cub", seed=1, metrics=top1(70.0))
    write_run(root, "trials/cub-lr0.5", task="cub", seed=42, final=False, metrics=top1(50.0))

    def cub_row(out):
        rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
        return next(r for r in rows if r["section"] == "task" and r["name"] == "cub")
    # issue 18: trials are left out by default (--only-final says so too) and never pooled with finals
    assert main(["report", str(root), "--out", str(tmp_path / "default")]) == 0
    assert main(["report", str(root), "--only-final", "--out", str(tmp_path / "final")]) == 0
    assert main(["report", str(root), "--include-trials", "--out", str(tmp_path / "all")]) == 0
    for out in ("default", "final"):
        row = cub_row(tmp_path / out)
        assert (row["n_seeds"], float(row["mean"])) == ("1", 70.0)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all" / "report.csv").read_text())))
    cub = sorted((r["n_seeds"], float(r["mean"])) for r in rows if r["section"] == "task" and r["name"] == "cub"
                 and r["mean"])
    assert cub == [("1", 50.0), ("1", 70.0)]


# -- an interrupted `gapt demo` -------------------------------------------------------------------
def test_interrupted_demo_reuses_finished_runs_and_resumes_the_interrupted_one(tmp_path):
    """Kill `gapt demo --quick` (SIGKILL, another process) once a run has finished and the next has saved
    its resume file; rerun: finished runs are reused untouched, the interrupted one continues from its
    resume file (its saved metrics lines stay byte for byte, timings included), summary.json is whole."""
    from gapt.demo.run import QUICK
    out = tmp_path / "demo"
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gapt", "demo", "--quick", "--out", str(out)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed, deadline = None, time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            folders = sorted({p.parent for p in out.rglob("config.yaml")})
            done = [d for d in folders if (d / "results.json").exists()]
            open_runs = [d for d in folders if not (d / "results.json").exists()]
            # a run whose resume file is written; after missing that moment twice, any unfinished run
            target = next((d for d in open_runs if (d / "last.pt").exists()), None)
            if target is None and len(done) >= 3 and open_runs:
                target = open_runs[0]
            if done and target is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = target
                break
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert killed is not None, "the demo ended before it could be interrupted:\n" + (tmp_path / "demo.log").read_text()[-2000:]
    assert not (out / "summary.json").exists()
    had_resume = (killed / "last.pt").exists() and not (killed / "results.json").exists()
    stamps = {d: (d / "results.json").stat().st_mtime_ns for d in done}
    saved_lines = (killed / "metrics.jsonl").read_text().splitlines() if had_resume else []

    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for d, stamp in stamps.items():  # reused, not retrained
        assert (d / "results.json").stat().st_mtime_ns == stamp, d
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(x)["epoch"] for x in lines]
    # every lr's run goes to the rung; only the chosen one runs on to the end (gapt/demo/run.py)
    assert epochs == list(range(1, len(epochs) + 1))  # epochs count from 1
    assert (killed / "results.json").exists() or len(epochs) == QUICK["rung"]
    assert lines[:len(saved_lines)] == saved_lines  # resumed: the epochs saved before the kill were not rerun
    summary = json.loads((out / "summary.json").read_text())
    chosen = json.loads((out / "demo.json").read_text())["tasks"]
    for task, methods in summary.items():
        for label, top1 in methods.items():
            res = json.loads((Path(chosen[task]["methods"][label]["folder"]) / "results.json").read_text())
            assert top1 == res["metrics"]["test_top1"]
    print("killed", killed.relative_to(out), "with a resume file" if had_resume else "mid-epoch")
