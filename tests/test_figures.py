"""Figure commands on fixture run folders (results.json written here in the trainer's layout):
the PNG exists and the JSON beside it holds the plotted numbers, checked against the fixtures."""
import json

import pytest
from PIL import Image

from gapt.cli import main

FGVC = ("cub", "flowers", "cars", "dogs", "nabirds")


def write_run(root, name, backbone, method, task, value, seed=42, temp=False, prompts=100, benchmark="fgvc",
              final=True):
    folder = root / name
    folder.mkdir(parents=True)
    metrics = ({"mIoU": value, "mIoU_ms": value + 1.0} if benchmark == "ade20k" else
               {"val_top1_best": value + 1, "best_epoch": 3, "test_top1": value + 0.5, "test_top1_last": value,
                "selection": "best-val"})  # figures show the last epoch (as the paper): value, not value + 0.5
    (folder / "results.json").write_text(json.dumps({
        "backbone": backbone, "method": method, "learn_temperature": temp, "num_prompts": prompts,
        "prompt_init": "random", "gate_init": 5.0, "insert_at_block": 1, "benchmark": benchmark, "task": task,
        "seed": seed, "final": final, "metrics": metrics, "tuned_params": 1000, "epochs": 100}))
    return value


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()


STEP = {"vpt-shallow": ("vpt-shallow", False), "gated": ("gated", False), "gated+temperature": ("gated", True)}


@pytest.fixture
def ablation_runs(tmp_path):
    root = tmp_path / "runs"
    expect = {}
    for s, step in enumerate(STEP):
        method, temp = STEP[step]
        for t, task in enumerate(FGVC):
            v = 50.0 + 5 * s + t
            write_run(root, f"mae-{task}-{step}", "mae_vitb16", method, task, v, temp=temp)
            expect[("mae_vitb16", step, task)] = v
        # a second seed for cub: the figure shows the mean of the two
        write_run(root, f"mae-cub-{step}-s2", "mae_vitb16", method, "cub", 50.0 + 5 * s + 3, seed=7, temp=temp)
        expect[("mae_vitb16", step, "cub")] = 50.0 + 5 * s + 1.5
        # MoCo: only CUB, so its FGVC mean is incomplete
        expect[("mocov3_vitb16", step, "cub")] = write_run(root, f"moco-cub-{step}", "mocov3_vitb16", method, "cub",
                                                           80.0 + s, temp=temp)
        expect[("mae_vitb16", step, "ade20k")] = write_run(root, f"mae-ade-{step}", "mae_vitb16", method, "ade20k",
                                                           30.0 + s, temp=temp, benchmark="ade20k")
    # a sweep trial at another lr: left out by default
    write_run(root / "sweep" / "trials", "lr5", "mae_vitb16", "vpt-shallow", "cub", 1.0, final=False)
    return root, expect


def test_ablation_figure_numbers(ablation_runs, tmp_path):
    root, expect = ablation_runs
    out = tmp_path / "fig6"
    assert main(["analyze", "ablation", str(root), "--out", str(out)]) == 0
    assert_png(out / "ablation.png")
    assert_png(out / "ablation_tasks.png")
    numbers = json.loads((out / "ablation.json").read_text())
    tasks = {(r["backbone"], r["step"], r["task"]): r for r in numbers["tasks"]}
    assert set(tasks) == set(expect)
    for key, value in expect.items():
        assert tasks[key]["value"] == pytest.approx(value)
    assert tasks[("mae_vitb16", "vpt-shallow", "cub")]["n"] == 2  # the trial is not among them
    assert tasks[("mae_vitb16", "gated+temperature", "cub")]["paper"] == 70.56
    assert tasks[("mae_vitb16", "gated", "cub")]["paper"] is None  # the paper prints no "+ GATE" number
    bench = {(r["backbone"], r["step"], r["benchmark"]): r for r in numbers["benchmarks"]}
    for step in STEP:
        mean = sum(expect[("mae_vitb16", step, t)] for t in FGVC) / 5
        assert bench[("mae_vitb16", step, "fgvc")]["value"] == pytest.approx(mean)
        assert bench[("mae_vitb16", step, "fgvc")]["plotted"] == pytest.approx(mean)
        moco = bench[("mocov3_vitb16", step, "fgvc")]
        assert moco["value"] is None and moco["tasks_missing"] == ["flowers", "cars", "dogs", "nabirds"]
        assert moco["plotted"] == pytest.approx(expect[("mocov3_vitb16", step, "cub")]) and not moco["complete"]
        assert bench[("mae_vitb16", step, "ade20k")]["value"] == pytest.approx(expect[("mae_vitb16", step, "ade20k")])
    assert bench[("mae_vitb16", "vpt-shallow", "fgvc")]["paper"] == 57.84
    assert bench[("mae_vitb16", "gated+temperature", "fgvc")]["paper"] == 73.39
    assert bench[("mae_vitb16", "gated", "ade20k")]["paper"] == 38.44
    assert "FGVC mean" in (out / "ablation.md").read_text()

    # with the trials, the lr-5 trial joins the cub mean
    assert main(["analyze", "ablation", str(root), "--include-trials", "--out", str(tmp_path / "t")]) == 0
    with_trials = json.loads((tmp_path / "t" / "ablation.json").read_text())
    cub = [r for r in with_trials["tasks"] if r["backbone"] == "mae_vitb16" and r["step"] == "vpt-shallow"
           and r["task"] == "cub"][0]
    assert cub["n"] == 3


def test_ablation_without_its_methods_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "r", "deep", "mae_vitb16", "vpt-deep", "cub", 60.0)
    assert main(["analyze", "ablation", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 1
    assert "vpt-shallow" in capsys.readouterr().err


def test_tokens_figure_numbers(tmp_path, capsys):
    root = tmp_path / "runs"
    ours = {}
    for per_block in (1, 2, 4, 8):  # VPT-deep on a 12-block backbone: 12 x prompts per block in all
        ours[("vpt-deep", 12 * per_block)] = write_run(root, f"deep{per_block}", "mae_vitb16", "vpt-deep", "cars",
                                                       50.0 + per_block, prompts=per_block)
    for total in (12, 24, 48, 96):
        ours[("gated+temperature", total)] = write_run(root, f"gated{total}", "mae_vitb16", "gated", "cars",
                                                       60.0 + total / 10, prompts=total, temp=True)
    write_run(root, "gated24-s2", "mae_vitb16", "gated", "cars", 70.0, prompts=24, temp=True, seed=1)
    ours[("gated+temperature", 24)] = (62.4 + 70.0) / 2
    write_run(root, "cub", "mae_vitb16", "gated", "cub", 10.0, prompts=24, temp=True)  # another task: left out
    out = tmp_path / "fig7"
    assert main(["analyze", "tokens", str(root), "--task", "cars", "--out", str(out)]) == 0
    assert_png(out / "tokens.png")
    numbers = json.loads((out / "tokens.json").read_text())
    got = {(p["method"], p["total_prompts"]): p["top1"] for p in numbers["points"]}
    assert got == pytest.approx(ours)
    paper = {(p["method"], p["total_prompts"], p["source"]): p["top1"] for p in numbers["paper"]}
    # Table 7 (Cars column) and the text's two points: both sources for VPT-deep at 48
    assert paper[("vpt-deep", 48, "Table 7")] == 64.06 and paper[("vpt-deep", 48, "text")] == 60.9
    assert paper[("ours", 24, "Table 7")] == 66.09 and paper[("ours", 24, "text")] == 66.1
    assert paper[("vpt-deep", 96, "Table 7")] == 67.63 and paper[("ours", 96, "Table 7")] == 72.16
    assert len(paper) == 8
    capsys.readouterr()
    assert main(["analyze", "tokens", str(root), "--task", "dogs", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "dogs" in err and "cars" in err


def test_gates_figure_panels_per_task_and_backbone(tmp_path):
    """Fig. 4: NABirds and Cars (MAE and MoCo v3) in one figure; gates.json holds each panel's r_l."""
    import math

    import torch
    from conftest import tiny_model
    fixtures = {}
    for name, task, backbone, logits in (("mae-nabirds", "nabirds", "test_mae_tiny", [2.0, -1.0, 0.5]),
                                         ("mae-cars", "cars", "test_mae_tiny", [-3.0, 1.0, 2.5]),
                                         ("moco-cars", "cars", "test_moco_tiny", [0.0, 0.0, -2.0])):
        model = tiny_model(backbone, method="gated")
        with torch.no_grad():
            model.gate_logits.copy_(torch.tensor(logits))
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        model.save_tuned(str(folder / "tuned.safetensors"))
        (folder / "results.json").write_text(json.dumps({"task": task, "backbone": backbone}))
        g = [1 / (1 + math.exp(-x)) for x in logits]  # SPEC §2 by hand
        w = [g[l] * math.prod(1 - g[k] for k in range(l + 1, len(g))) for l in range(len(g))]
        fixtures[name] = (task, backbone, [x / sum(w) for x in w])
    out = tmp_path / "fig4"
    assert main(["analyze", "gates", *(str(tmp_path / "runs" / n) for n in fixtures), "--out", str(out)]) == 0
    assert_png(out / "gates_tasks.png")
    saved = json.loads((out / "gates.json").read_text())
    assert [p["task"] for p in saved["panels"]] == ["nabirds", "cars"]
    for panel in saved["panels"]:
        for s in panel["series"]:
            task, backbone, ratio = fixtures[s["label"]]
            assert (panel["task"], s["backbone"]) == (task, backbone)
            assert s["selection_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert {(r["task"], r["backbone"]) for r in saved["runs"]} == {(t, b) for t, b, _ in fixtures.values()}
