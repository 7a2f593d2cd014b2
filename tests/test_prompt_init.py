"""The data-driven prompt inits in a run: config checks, the record in the run folder, resume, the sweep
grids, the SPT / VIPAMIN presets (SPEC §12.1(d), §12.2(d), typed again here) and the benchmark's smoke run.
The inits' maths are checked against the authors' code in test_spt.py and test_vipamin.py."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import gapt
from gapt.config import ConfigError, key_help, load_config

PRESETS = Path(gapt.__file__).parent / "configs"
SMALL_RUN = ("backbone=test_mae_tiny weights=null image_size=32 num_prompts=2 train.epochs=2 train.warmup_epochs=0 "
             "train.batch_size=32 data.num_workers=0 device=cpu data.format=shapes data.name=count "
             "data.num_samples=64").split()


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key", [
    (["method=linear", "prompt_init=spt"], "prompt_init"),
    (["method=lora", "prompt_init=vipamin"], "prompt_init"),
    (["method=vfpt", "prompt_init=vipamin"], "prompt_init"),  # VFPT transforms its prompts: not VPT's tokens
    (["method=vpt-deep", "vipamin_k=8"], "vipamin_k"),        # a key of an init that is not chosen
    (["method=vpt-deep", "prompt_init=spt", "vipamin_lambda=1"], "vipamin_lambda"),
    (["method=vpt-deep", "spt_images=4"], "spt_images"),
    (["method=vpt-deep", "prompt_init=vipamin", "vipamin_lambda=1.5"], "vipamin_lambda"),
    (["method=vpt-deep", "prompt_init=vipamin", "vipamin_k=0"], "vipamin_k"),
    (["method=vpt-deep", "prompt_init=spt", "spt_images=-1"], "spt_images"),
])
def test_config_refuses_what_cannot_work(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_config_accepts_the_combinations():
    for method in ("vpt-shallow", "vpt-deep", "gated", "gated+lora", "vpt-deep+ssf", "vpt-at-block"):
        for init, extra in (("spt", ["spt_images=3"]), ("vipamin", ["vipamin_k=8", "vipamin_lambda=1"]),
                            ("prototype", [])):
            cfg = load_config(None, [f"method={method}", f"prompt_init={init}", "learn_temperature=true", *extra])
            assert cfg.prompt_init == init
    assert "SPT" in key_help("prompt_init") and "with replacement" in key_help("spt_images")
    assert "k best-matching" in key_help("vipamin_k") and "orthogonal" in key_help("vipamin_lambda")


# -- a run: the init once before step 0, recorded, not redone on resume -------------------------------
def _never(*a, **k):
    raise AssertionError("a resumed run must not initialise its prompts again")


@pytest.mark.parametrize("init,method", [("spt", "vpt-deep"), ("vipamin", "gated")])
def test_run_records_the_init_and_resume_keeps_it(init, method, tmp_path, monkeypatch):
    from gapt.engine import prompt_init as P
    from gapt.engine.trainer import train
    seen = {}
    real = {"spt": P.init_prompts_spt, "vipamin": P.init_prompts_vipamin}[init]

    def spy(model, data, **kw):
        seen["kw"] = kw
        record = real(model, data, **kw)
        seen["prompts"] = model.prompt_embeddings.detach().clone()
        return record
    monkeypatch.setattr(P, f"init_prompts_{init}", spy)
    extra = ["vipamin_k=4", "vipamin_lambda=0.5", "learn_temperature=true"] if init == "vipamin" else []
    cfg = load_config(None, SMALL_RUN + [f"method={method}", f"prompt_init={init}", f"out={tmp_path / 'run'}", *extra])
    assert train(cfg, stop_after_epoch=0) == {"stopped_after_epoch": 0}
    record = json.loads((tmp_path / "run" / "prompt_init.json").read_text())
    assert record["prompt_init"] == init and record["method"] == method and record["train_size"] == 64
    if init == "spt":  # MAE: the whole train set resampled, seeded by train.seed
        assert (record["seed"], record["images"], seen["kw"]["num_images"]) == (42, 64, 0)
        assert sorted(record["blocks"], key=int) == ["1", "2", "3", "4"]
        assert all(len(b["tokens"]) == 2 for b in record["blocks"].values())
    else:  # one batch of min(256, 64), seed 0, the config's k and lambda
        assert (record["seed"], record["images"], record["vipamin_k"], record["vipamin_lambda"]) == (0, 64, 4, 0.5)
        assert seen["kw"]["k"] == 4 and seen["kw"]["lam"] == 0.5 and list(record["blocks"]) == ["1"]
    before = (tmp_path / "run" / "prompt_init.json").read_text()
    monkeypatch.setattr(P, f"init_prompts_{init}", _never)
    from gapt.engine.run import config_for_resume
    results = train(config_for_resume(str(tmp_path / "run")), resume=True)
    assert results["prompt_init"] == init and (tmp_path / "run" / "prompt_init.json").read_text() == before
    if init == "vipamin":
        assert (results["vipamin_k"], results["vipamin_lambda"]) == (4, 0.5)


# -- sweep grids ------------------------------------------------------------------------------------
def test_vipamin_grid_is_its_63_trials():
    from gapt.sweep.grid import build_grid, grid_points, point_names
    points = grid_points(build_grid("vipamin", [], {}))
    assert len(points) == 7 * 9
    base = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]  # SPEC §12.2(d), scaled by its batch 32 / 256
    assert sorted({float(p["train.lr"]) for p in points}) == pytest.approx([b * 32 / 256 for b in base])
    pairs = [(int(p["vipamin_k"]), float(p["vipamin_lambda"])) for p in points[:9]]  # run_indiv.sh's order
    assert pairs == [(2, 0), (8, 0), (32, 0), (128, 0), (2, .5), (8, .5), (32, .5), (128, .5), (2, 1)]
    assert len(set(point_names(points))) == 63 and point_names(points)[0] == "lr0.00625_lam0_k2"
    # the rule holds for any grid: at lambda = 1 only the first k runs
    assert len(grid_points({"vipamin_k": ["8", "2"], "vipamin_lambda": ["1", "1.0"]})) == 2


def test_sweep_plans_the_vipamin_and_spt_grids():
    from gapt.sweep.run import plan_sweep
    for preset, grid, n in (("vtab/mae_vitb16/vipamin/dtd", "vipamin", 63),
                            ("fgvc/mocov3_vitb16/spt-deep/dogs", "spt", 6)):
        plan = plan_sweep(preset, ["weights=null"], grid)
        assert len(plan.trials) == n and not [t.config_error for t in plan.trials if t.config_error]


# -- presets (SPEC §12.1(d), §12.2(d), typed again) ---------------------------------------------------
FGVC = {"cub", "nabirds", "flowers", "dogs", "cars"}


@pytest.mark.parametrize("variant", ["spt-shallow", "spt-deep", "vipamin", "vipamin-deep"])
def test_presets_carry_each_recipe(variant):
    files = sorted(PRESETS.glob(f"*/*/{variant}/*.yaml"))
    assert len(files) == 2 * (5 + 19)
    for f in files:
        cfg, text, backbone = load_config(str(f)), f.read_text(), f.parent.parent.name
        deep = variant.endswith("deep")
        assert (cfg.method, cfg.num_prompts) == (("vpt-deep", 20) if deep else ("vpt-shallow", 100))
        assert (cfg.train.optimizer, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == \
            ("adamw", 0.01, 32, 100)
        assert cfg.prompt_dropout == 0.0 and not cfg.train.head_bias_decay and cfg.train.precision == "fp32"
        assert cfg.data.name == f.stem and cfg.data.format == ("fgvc" if f.stem in FGVC else "vtab")
        if variant.startswith("spt"):
            assert (cfg.prompt_init, cfg.spt_images, cfg.train.schedule) == ("spt", 0, "cosine")
            readme = {"mae_vitb16": (0.05, 0.5, "cub"), "mocov3_vitb16": (0.001, 3.0, "dogs")}[backbone]
            assert (cfg.train.lr, cfg.train.head_weight_decay) == readme[:2]
            assert ("NEEDS THE LR SWEEP" in text) == (not (deep and f.stem == readme[2]))
        else:
            assert (cfg.prompt_init, cfg.train.schedule, cfg.train.head_weight_decay) == ("vipamin", "cosine_epoch", -1)
            assert cfg.pooling == ("mean_fc_norm" if backbone == "mae_vitb16" else "")
            assert "NEEDS THE GRID SWEEP" in text and "--grid vipamin" in text


# -- the benchmark --------------------------------------------------------------------------------
def test_benchmark_smoke(capsys):
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import prompt_init
    from benchmarks._common import Clock, print_results
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = prompt_init.run(quick=True, device=torch.device("cpu"), clock=Clock("cpu"))
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    print_results(results)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"prompt_init_{k}" for k in prompt_init.INITS]
    for line in lines:
        value = float(re.match(r"^\w+: ([^x ]+)x \(", line).group(1))
        assert math.isfinite(value) and value > 0, line
