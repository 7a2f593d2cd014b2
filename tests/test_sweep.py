"""gapt sweep: grid parsing, choice + finals, resume of a killed sweep, failed trials, worker
processes, benchmarks, the Ray Tune backend (with ASHA) on a local 2-CPU Ray instance."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from gapt.cli import main
from gapt.config import ConfigError
from gapt.engine import trainer
import gapt.sweep as S
from gapt.sweep import grid as G
from gapt.sweep.jobs import SweepError

TESTS = Path(__file__).resolve().parent
REAL_TRAIN = trainer.train
TINY = ["data.format=shapes", "data.name=count", "data.num_samples=64", "backbone=test_mae_tiny", "weights=null",
        "image_size=32", "num_prompts=2", "train.epochs=2", "train.warmup_epochs=1", "train.batch_size=32",
        "data.num_workers=0", "device=cpu"]


def tiny(out, *extra):
    return TINY + [f"out={out}"] + list(extra)


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


def best_trial(out, names):
    """The expected choice: max val top-1 over the trials' results.json, ties -> first in grid order."""
    vals = [results(out / "trials" / n)["metrics"]["val_top1_best"] for n in names]
    return names[vals.index(max(vals))]


class Killed(BaseException):
    """What a kill looks like to the sweep: not an Exception, so not a failed trial."""


class CountingTrain:
    """Stands in for trainer.train: records (folder, resume) and runs the real one or fails."""

    def __init__(self, real, fail_when=None, kill_at=None):
        self.real, self.fail_when, self.kill_at, self.calls = real, fail_when, kill_at, []

    def __call__(self, cfg, resume=False, **kw):
        name = Path(cfg.out).name
        self.calls.append((name, resume))
        if self.fail_when and self.fail_when(cfg):
            raise RuntimeError(f"boom in {name}")
        if self.kill_at == name:  # killed after epoch 0's resume file: last.pt, no results.json
            self.real(cfg, resume=resume, stop_after_epoch=0)
            raise Killed
        return self.real(cfg, resume=resume, **kw)


# -- parsing ------------------------------------------------------------------------------------
def test_parse_lists_fixed_and_errors():
    fixed, swept = G.parse_sweep_overrides(["train.lr=0.1,0.5,1.0", "num_prompts=5", "gate_init=1,5,10,20",
                                            r"data.root=/data/a\,b", "train.weight_decay=0,0.0"])
    assert swept == {"train.lr": ["0.1", "0.5", "1.0"], "gate_init": ["1", "5", "10", "20"]}
    # a single value, and a list whose values are all equal, are plain overrides
    assert fixed == ["num_prompts=5", "data.root=/data/a,b", "train.weight_decay=0"]
    with pytest.raises(ConfigError, match="train.lr"):
        G.parse_sweep_overrides(["lr=0.1,0.5"])  # unknown key, with a suggestion
    with pytest.raises(ConfigError, match="data.final"):
        G.parse_sweep_overrides(["data.final=true"])
    with pytest.raises(ConfigError, match="empty value"):
        G.parse_sweep_overrides(["train.lr=0.1,"])


def test_grids_and_names():
    assert G.build_grid("spec", [], {}) == {"train.lr": G.SPEC_LR}
    assert G.SPEC_LR == ["0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"]
    # an explicit lr list replaces the default lr grid; a single lr fixes it
    assert G.build_grid("spec", [], {"train.lr": ["0.1", "0.5"], "num_prompts": ["1", "5"]}) == \
        {"train.lr": ["0.1", "0.5"], "num_prompts": ["1", "5"]}
    assert G.build_grid("spec", ["train.lr=0.5"], {"gate_init": ["1", "5"]}) == {"gate_init": ["1", "5"]}
    vpt = G.grid_points(G.build_grid("vpt", [], {}))
    assert len(vpt) == 40 and vpt[0] == {"train.lr": "50", "train.weight_decay": "0.01"}
    assert vpt[3] == {"train.lr": "50", "train.weight_decay": "0"} and vpt[4]["train.lr"] == "25"
    assert G.point_names([{"train.lr": "0.5", "train.weight_decay": "0"}]) == ["lr0.5_wd0"]
    assert G.point_names([{"method": "vpt-deep", "num_prompts": "10"}]) == ["method-vpt-deep_np10"]


def test_cli_dry_run_lists_the_grid(tmp_path, capsys):
    out = tmp_path / "sw"
    # KEY=VALUE items may come before and after options
    rc = main(["sweep", *tiny(out)[:4], "--dry-run", "--json", "--seeds", "2", *tiny(out)[4:],
               "train.lr=0.1,1.0", "num_prompts=1,2"])
    assert rc == 0
    state = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in state["trials"]] == ["lr0.1_np1", "lr0.1_np2", "lr1.0_np1", "lr1.0_np2"]
    assert state["trials"][1]["overrides"] == {"train.lr": 0.1, "num_prompts": 2}
    assert state["grid"] == {"train.lr": [0.1, 1.0], "num_prompts": [1, 2]} and state["seeds"] == 2
    assert not out.exists()
    assert main(["sweep", "fgvc", "--backbone", "mae_vitb16"]) == 1
    assert "--root" in capsys.readouterr().err
    assert main(["sweep", "--config", "x.yaml", "--root", "/data"]) == 1
    assert main(["sweep", *tiny(out), "--early-stop", "asha"]) == 1
    assert "--backend ray" in capsys.readouterr().err


# -- the sweep in this process ------------------------------------------------------------------
def test_choice_finals_and_sweep_json(tmp_path):
    out = tmp_path / "sw"
    state = S.run_sweep(None, tiny(out, "train.lr=0.05,0.5,5.0"), seeds=2, workers=0)
    names = ["lr0.05", "lr0.5", "lr5.0"]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(state)) and saved["status"] == "done"
    assert [t["name"] for t in saved["trials"]] == names
    for t in saved["trials"]:
        r = results(out / t["folder"])
        assert t["status"] == "done" and r["final"] is False and t["folder"] == f"trials/{t['name']}"
        assert t["val_top1"] == r["metrics"]["val_top1_best"] and t["test_top1"] == r["metrics"]["test_top1"]
        assert t["overrides"]["train.lr"] == r["lr"]
    chosen = best_trial(out, names)
    assert saved["choice"]["name"] == chosen
    lr = results(out / "trials" / chosen)["lr"]
    assert [f["folder"] for f in saved["finals"]] == ["final/seed42", "final/seed43"]
    tests = []
    for f, seed in zip(saved["finals"], (42, 43)):
        r = results(out / f["folder"])
        assert r["final"] is True and r["seed"] == seed and r["lr"] == lr and f["status"] == "done"
        tests.append(r["metrics"]["test_top1"])
    summary = saved["final_test_top1"]
    assert summary["n"] == 2 and summary["values"] == tests
    assert summary["mean"] == pytest.approx(statistics.fmean(tests))
    assert summary["std"] == pytest.approx(statistics.stdev(tests))
    # every trial and final is an ordinary run folder that gapt report reads
    from gapt.report.tables import collect_runs
    runs = collect_runs(out)
    assert len(runs) == 5 and sum(r["final"] for r in runs) == 2


def test_killed_sweep_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    args = (None, tiny(out, "train.lr=0.1,0.5,1.0"))
    killed = CountingTrain(REAL_TRAIN, kill_at="lr0.5")
    monkeypatch.setattr(trainer, "train", killed)
    with pytest.raises(Killed):
        S.run_sweep(*args, seeds=1, workers=0)
    assert killed.calls == [("lr0.1", False), ("lr0.5", False)]
    first = out / "trials" / "lr0.1" / "results.json"
    mtime = first.stat().st_mtime_ns
    assert (out / "trials" / "lr0.5" / "last.pt").exists() and not (out / "trials" / "lr0.5" / "results.json").exists()
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"

    again = CountingTrain(REAL_TRAIN)
    monkeypatch.setattr(trainer, "train", again)
    state = S.run_sweep(*args, seeds=1, workers=0)
    # finished trial skipped, interrupted one resumed from last.pt, the rest run fresh
    assert again.calls == [("lr0.5", True), ("lr1.0", False), ("seed42", False)]
    assert first.stat().st_mtime_ns == mtime
    epochs = [json.loads(l)["epoch"] for l in (out / "trials" / "lr0.5" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # epochs count from 1
    assert state["choice"]["name"] == best_trial(out, ["lr0.1", "lr0.5", "lr1.0"])

    third = CountingTrain(REAL_TRAIN)
    monkeypatch.setattr(trainer, "train", third)
    assert S.run_sweep(*args, seeds=1, workers=0)["final_test_top1"] == state["final_test_top1"]
    assert third.calls == []  # nothing redone, finals included
    # a restart with other settings is refused instead of mixing runs
    with pytest.raises(SweepError, match="other settings"):
        S.run_sweep(None, tiny(out, "train.lr=0.1,0.5,1.0", "train.epochs=3"), seeds=1, workers=0)


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    fake = CountingTrain(REAL_TRAIN, fail_when=lambda cfg: cfg.train.lr == 5.0)
    monkeypatch.setattr(trainer, "train", fake)
    args = (None, tiny(out, "train.lr=0.1,5.0", "num_prompts=0,2"))  # num_prompts=0 is invalid for gated
    state = S.run_sweep(*args, seeds=0, workers=0)
    by_name = {t["name"]: t for t in state["trials"]}
    assert by_name["lr0.1_np2"]["status"] == "done" and state["choice"]["name"] == "lr0.1_np2"
    assert by_name["lr5.0_np2"]["status"] == "failed" and "RuntimeError: boom" in by_name["lr5.0_np2"]["error"]
    assert "num_prompts" in by_name["lr0.1_np0"]["error"] and by_name["lr5.0_np0"]["status"] == "failed"
    assert json.loads((out / "trials" / "lr5.0_np2" / "error.json").read_text())["error"].startswith("RuntimeError")
    assert state["finals"] == [] and state["status"] == "done"
    assert [c[0] for c in fake.calls] == ["lr0.1_np2", "lr5.0_np2"]
    # a restart keeps the failure; --retry-failed runs it again
    fake.calls.clear()
    S.run_sweep(*args, seeds=0, workers=0)
    assert fake.calls == []
    S.run_sweep(*args, seeds=0, workers=0, retry_failed=True)
    assert fake.calls == [("lr5.0_np2", False)]

    # every trial failing is an error, on the CLI too
    monkeypatch.setattr(trainer, "train", CountingTrain(REAL_TRAIN, fail_when=lambda cfg: True))
    out2 = tmp_path / "all_fail"
    with pytest.raises(SweepError, match="all 2 trial"):
        S.run_sweep(None, tiny(out2, "train.lr=0.1,0.5"), workers=0)
    assert json.loads((out2 / "sweep.json").read_text())["status"] == "failed"
    assert main(["sweep", *tiny(tmp_path / "cli_fail"), "train.lr=0.1,0.5", "--workers", "0"]) == 1
    assert "all 2 trial(s)" in capsys.readouterr().err


# -- worker processes ---------------------------------------------------------------------------
def test_worker_processes(tmp_path):
    out = tmp_path / "sw"
    # 2 CPU workers; conftest registers the tiny backbone in each; an unknown task fails in its worker
    state = S.run_sweep(None, tiny(out, "data.name=count,no_such_task"), grid="none", seeds=0, workers=2,
                        preload=[str(TESTS / "conftest.py")])
    by_name = {t["name"]: t for t in state["trials"]}
    assert state["backend"] == "process"
    assert by_name["name-count"]["status"] == "done" and results(out / "trials" / "name-count")["final"] is False
    failed = by_name["name-no_such_task"]
    assert failed["status"] == "failed" and "no_such_task" in failed["error"]
    log = (out / "trials" / "name-count" / "train.log").read_text()
    assert "--threads 1" in log and "epoch 2/2" in log


def test_importing_sweep_does_not_import_ray():
    code = "import sys, gapt.cli, gapt.sweep.run; gapt.cli.build_parser(); print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False"]


def test_ray_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "gapt.sweep.ray_tune", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SweepError, match=r"pip install gapt\[ray\]"):
        S.run_sweep(None, tiny(tmp_path / "sw", "train.lr=0.1,0.5"), backend="ray")


# -- benchmarks ---------------------------------------------------------------------------------
def _preset(path, fmt, name, root):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"backbone: test_mae_tiny\nweights: null\ndata:\n  format: {fmt}\n  name: {name}\n"
                    f"  root: {root}\nout: runs/{name}\n")


def test_benchmark_runs_each_dataset_and_skips_missing(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    _preset(presets / "fgvc" / "tiny" / "cub.yaml", "fgvc", "cub", "/path/to/CUB_200_2011")
    _preset(presets / "fgvc" / "tiny" / "dogs.yaml", "fgvc", "dogs", "/path/to/Stanford-dogs")
    _preset(presets / "vtab" / "tiny" / "dtd.yaml", "vtab", "dtd", "/path/to/vtab-1k")
    root = tmp_path / "data"
    (root / "CUB_200_2011").mkdir(parents=True)
    (root / "dtd").mkdir()
    calls = []

    def fake_sweep(config, overrides, **kw):
        calls.append((Path(config).stem, list(overrides), kw))
        return {"status": "done", "choice": {"name": "lr0.1"}, "final_test_top1": {"mean": 50.0, "n": 3}}

    monkeypatch.setattr(S.benchmark, "run_sweep", fake_sweep)  # the name run_benchmark calls
    out = tmp_path / "bench"
    summary = S.run_benchmark("fgvc", str(root), "tiny", weights="w.pth", overrides=["train.lr=0.1,0.5"],
                              out=str(out), presets=presets, seeds=3)
    assert [c[0] for c in calls] == ["cub"]  # dogs' folder is missing
    _, overrides, kw = calls[0]
    assert f"data.root={root / 'CUB_200_2011'}" in overrides and f"out={out / 'cub'}" in overrides
    assert "weights=w.pth" in overrides and overrides[-1] == "train.lr=0.1,0.5" and kw["seeds"] == 3
    status = {t["name"]: t["status"] for t in json.loads((out / "benchmark.json").read_text())["tasks"]}
    assert status == {"cub": "done", "dogs": "skipped"} and summary["failed"] == 0
    calls.clear()
    S.run_benchmark("vtab", str(root), "tiny", out=str(out), presets=presets)
    assert f"data.root={root}" in calls[0][1]
    with pytest.raises(SweepError, match="no fgvc dataset folder"):
        S.run_benchmark("fgvc", str(tmp_path / "empty"), "tiny", out=str(out), presets=presets)
    with pytest.raises(SweepError, match="presets exist for"):
        S.run_benchmark("fgvc", str(root), "no_such_backbone", presets=presets)


def test_shipped_presets_are_found():
    names = [n for n, _ in S.benchmark_tasks("fgvc", "mae_vitb16")]
    assert names == ["cub", "flowers", "cars", "dogs", "nabirds"]
    assert len(S.benchmark_tasks("vtab", "mocov3_vitb16")) == 19


# -- Ray Tune -----------------------------------------------------------------------------------
def test_ray_backend_with_asha(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "sw"
    args = (None, tiny(out, "train.lr=0.1,1.0,5.0"))
    kw = dict(seeds=1, backend="ray", early_stop="asha", preload=[str(TESTS / "conftest.py")],
              ray_options={"asha_grace": 1, "asha_reduction": 2})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        state = S.run_sweep(*args, **kw)
        assert state["backend"] == "ray" and state["status"] == "done"
        statuses = {t["name"]: t["status"] for t in state["trials"]}
        assert set(statuses.values()) <= {"done", "stopped"} and "done" in statuses.values()
        done = [n for n, s in statuses.items() if s == "done"]
        for name, status in statuses.items():
            assert (out / "trials" / name / "stopped.json").exists() == (status == "stopped")
        assert state["choice"]["name"] == best_trial(out, done)
        final = results(out / "final" / "seed42")
        assert final["final"] is True and final["lr"] == results(out / "trials" / state["choice"]["name"])["lr"]
        assert state["final_test_top1"]["values"] == [final["metrics"]["test_top1"]]
        # the same command again: nothing is rerun, stopped trials stay stopped
        mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/results.json")}
        again = S.run_sweep(*args, **kw)
        assert {t["name"]: t["status"] for t in again["trials"]} == statuses
        assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/results.json")} == mtimes
    finally:
        ray.shutdown()


def test_a_failed_trial_makes_the_cli_exit_non_zero_after_the_summary(tmp_path, capsys):
    # num_prompts=0 is invalid for gated: that trial fails, the other finishes and is chosen
    rc = main(["sweep", *tiny(tmp_path / "sw", "train.epochs=1"), "num_prompts=0,2", "--grid", "none", "--workers", "0",
               "--seeds", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 run(s) failed: np0" in err
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert state["status"] == "done" and state["choice"]["name"] == "np2"


def test_a_misspelled_backbone_stops_the_sweep_before_any_trial(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", *tiny(out, "backbone=test_mae_tinny"), "train.lr=0.1,0.5", "--workers", "0"]) == 1
    assert "did you mean 'test_mae_tiny'" in capsys.readouterr().err
    assert not out.exists()


# -- FGVC: the final at the chosen trial's seed is that trial (issue 25) -------------------------
def fgvc_args(out, root):
    return ["data.format=fgvc", "data.name=cub", f"data.root={root}", "data.cache=none", "backbone=test_mae_tiny",
            "weights=null", "image_size=32", "num_prompts=2", "train.epochs=2", "train.warmup_epochs=1",
            "train.batch_size=6", "data.num_workers=0", "device=cpu", f"out={out}"]


def test_fgvc_final_at_the_trial_seed_reuses_the_chosen_trial(tmp_path, monkeypatch):
    import shutil
    from gapt.config import load_config
    from gapt.report.tables import build_report, collect_runs
    from test_engine import metrics_without_timing
    from test_reproduce import make_fgvc
    root = tmp_path / "CUB_200_2011"
    make_fgvc(root, "images")
    out = tmp_path / "sw"
    args = (None, fgvc_args(out, root) + ["train.lr=0.05,0.5"])
    counting = CountingTrain(REAL_TRAIN)
    monkeypatch.setattr(trainer, "train", counting)
    state = S.run_sweep(*args, seeds=2, workers=0)
    chosen = state["choice"]["name"]
    assert chosen == best_trial(out, ["lr0.05", "lr0.5"])
    # FGVC finals train on train.json and select on val.json, as trials do: seed 42 is the chosen trial itself
    assert counting.calls == [("lr0.05", False), ("lr0.5", False), ("seed43", False)]
    f42, f43 = state["finals"]
    assert (f42["status"], f42["reused_from"], f43["status"]) == ("done", f"trials/{chosen}", "done")
    assert "reused_from" not in f43
    assert json.loads((out / "sweep.json").read_text())["finals"][0]["reused_from"] == f"trials/{chosen}"
    trial, final = results(out / "trials" / chosen), results(out / "final" / "seed42")
    assert (trial["final"], final["final"], final["reused_from"]) == (False, True, f"trials/{chosen}")
    assert final["metrics"] == trial["metrics"] and final["seed"] == trial["seed"] == 42
    assert (out / "final/seed42/metrics.jsonl").read_text() == (out / "trials" / chosen / "metrics.jsonl").read_text()
    cfg = load_config(str(out / "final" / "seed42" / "config.yaml"), saved=True)
    assert cfg.data.final is True and cfg.out == str(out / "final" / "seed42") and cfg.train.seed == 42
    # it really is the same run: the final trained from scratch gives the trial's numbers, epoch by epoch
    lr = trial["lr"]
    fresh = REAL_TRAIN(load_config(None, fgvc_args(tmp_path / "fresh", root) + [f"train.lr={lr}", "data.final=true"]))
    assert fresh["final"] is True and fresh["metrics"] == trial["metrics"]
    assert metrics_without_timing(tmp_path / "fresh") == metrics_without_timing(out / "final" / "seed42")
    # gapt report: two final seeds, the reused one among them; trials left out
    rep = build_report(collect_runs(out))
    from gapt.report.collect import run_method_key
    row = rep.task("fgvc", "test_mae_tiny", run_method_key(final), "cub")
    assert (row["n_seeds"], row["seeds"], row["final"], rep.trials_left_out) == (2, "42 43", "yes", 2)
    # a restart trains nothing and still says where seed 42 comes from
    counting.calls.clear()
    again = S.run_sweep(*args, seeds=2, workers=0)
    assert counting.calls == [] and again["finals"][0]["reused_from"] == f"trials/{chosen}"
    # a copy killed half-way (a temporary folder, a final folder with only the sweep's trial.yaml) is made again
    shutil.rmtree(out / "final" / "seed42")
    (out / "final" / ".seed42.reusing").mkdir()
    (out / "final" / ".seed42.reusing" / "results.json").write_text("{}")
    (out / "final" / "seed42").mkdir()
    shutil.copy(out / "final" / "seed43" / "trial.yaml", out / "final" / "seed42" / "trial.yaml")
    (out / "final" / "seed42" / "trial.yaml").write_text(
        (out / "final" / "seed42" / "trial.yaml").read_text().replace("seed: 43", "seed: 42").replace("seed43", "seed42"))
    third = S.run_sweep(*args, seeds=2, workers=0)
    assert counting.calls == [] and third["finals"][0]["reused_from"] == f"trials/{chosen}"
    assert results(out / "final" / "seed42")["metrics"] == trial["metrics"]
    assert not (out / "final" / ".seed42.reusing").exists()


def test_finals_on_other_data_than_the_trials_are_trained(tmp_path):
    """VTAB-1k's final split (train800val200) is not a trial's (train800): no final is reused there; nor is a
    final of another seed, or one whose trial folder holds other settings."""
    from gapt.config import load_config
    from gapt.sweep.jobs import Job
    from gapt.sweep.reuse import why_not_reusable
    import dataclasses

    def job(kind, name, *over):
        cfg = load_config(None, TINY + [f"out={tmp_path / name}", *over])
        return Job(kind, name, tmp_path / name, {}, cfg=cfg)
    trial = job("trial", "t", "data.format=vtab", "data.name=dtd", "data.root=/x")
    final = job("final", "f", "data.format=vtab", "data.name=dtd", "data.root=/x", "data.final=true")
    assert "final split" in why_not_reusable(final, trial)
    trial = job("trial", "t", "data.format=fgvc", "data.name=cub", "data.root=/x")
    final = job("final", "f", "data.format=fgvc", "data.name=cub", "data.root=/x", "data.final=true",
                "train.seed=43")
    assert "train.seed" in why_not_reusable(final, trial)
    final.cfg = dataclasses.replace(final.cfg, train=dataclasses.replace(final.cfg.train, seed=42))
    assert "not finished" in why_not_reusable(final, trial)
