"""`gapt reproduce figN`: the figure plans (what they run) and their renders on fixture results."""
import json
from pathlib import Path

import pytest

from gapt.cli import main


def _result(backbone, method, task, value, lt=False, prompts=100, benchmark="fgvc", seed=42):
    metrics = {"mIoU": value, "mIoU_ms": value} if benchmark == "ade20k" else {"test_top1": value, "test_top1_last": value}
    return {"backbone": backbone, "method": method, "learn_temperature": lt, "num_prompts": prompts,
            "prompt_init": "random", "benchmark": benchmark, "task": task, "seed": seed, "final": True,
            "metrics": metrics}


def test_figure_plans_are_registered_and_their_presets_exist():
    from gapt.paper.plans import PLANS, PRESETS
    for name in ("fig1", "fig2", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9", "fig10", "fig11"):
        plan = PLANS[name]()
        assert plan.name == name and plan.render is not None
        for s in plan.specs:
            assert (PRESETS / s.preset).is_file(), s.preset


def test_fig1_plan_follows_spec():
    from gapt.config import load_config
    from gapt.paper.plans import PLANS, PRESETS
    plan = PLANS["fig1"]()
    assert len(plan.specs) == 2 * 3 * 12
    lrs = {}
    for s in plan.specs:
        cfg = load_config(str(PRESETS / s.preset), s.overrides)
        assert cfg.method == "vpt-at-block" and cfg.backbone == s.backbone and not cfg.learn_temperature
        lrs[(s.task, s.backbone)] = cfg.train.lr
    # SPEC §8 Fig. 1: CUB 0.1 (MAE, supervised), 1.0 (MoCo v3); KITTI 0.1 for all
    assert lrs == {("cub", "mae_vitb16"): 0.1, ("cub", "sup_vitb16"): 0.1, ("cub", "mocov3_vitb16"): 1.0,
                   ("kitti", "mae_vitb16"): 0.1, ("kitti", "sup_vitb16"): 0.1, ("kitti", "mocov3_vitb16"): 0.1}
    assert sorted({int(s.row.split("@")[1]) for s in plan.specs}) == list(range(1, 13))


def test_fig6_fig7_plans():
    from gapt.config import load_config
    from gapt.paper.plans import PLANS, PRESETS
    plan = PLANS["fig6"]()
    steps = {}
    for s in plan.specs:
        cfg = load_config(str(PRESETS / s.preset), s.overrides)
        steps.setdefault((s.backbone, s.task), set()).add((cfg.method, cfg.learn_temperature))
    assert len(steps) == 2 * (5 + 19 + 1)
    assert all(v == {("vpt-shallow", False), ("gated", False), ("gated", True)} for v in steps.values())
    plan7 = PLANS["fig7"]()
    totals = set()
    for s in plan7.specs:
        cfg = load_config(str(PRESETS / s.preset), s.overrides)
        assert cfg.backbone == "mae_vitb16" and s.task == "cars"
        totals.add((cfg.method, cfg.num_prompts * (12 if cfg.method == "vpt-deep" else 1)))
    assert totals == {(m, t) for m in ("vpt-deep", "gated") for t in (12, 24, 48, 96)}


def test_render_ablation_and_tokens_from_results(tmp_path):
    from gapt.paper.plans import PLANS
    results = {"a": [_result("mae_vitb16", "vpt-shallow", "cub", 40.0)],
               "b": [_result("mae_vitb16", "gated", "cub", 50.0)],
               "c": [_result("mae_vitb16", "gated", "cub", 60.0, lt=True), _result("mae_vitb16", "gated", "cub", 62.0,
                                                                                 lt=True, seed=43)]}
    plan = PLANS["fig6"]()
    paths = plan.render(plan, results, tmp_path)
    numbers = json.loads(Path([p for p in paths if str(p).endswith(".json")][0]).read_text())
    got = {r["step"]: r["value"] for r in numbers["tasks"]}
    assert got == {"vpt-shallow": 40.0, "gated": 50.0, "gated+temperature": 61.0}
    assert all(Path(p).is_file() for p in paths)
    plan7 = PLANS["fig7"]()
    results = {"x": [_result("mae_vitb16", "vpt-deep", "cars", 55.0, prompts=2)],
               "y": [_result("mae_vitb16", "gated", "cars", 66.0, lt=True, prompts=24)]}
    paths = plan7.render(plan7, results, tmp_path)
    pts = json.loads(Path([p for p in paths if str(p).endswith(".json")][0]).read_text())["points"]
    assert {(p["method"], p["total_prompts"], p["top1"]) for p in pts} == {("vpt-deep", 24, 55.0),
                                                                           ("gated+temperature", 24, 66.0)}


def test_render_fig1_curves(tmp_path):
    from gapt.paper.plans import PLANS
    plan = PLANS["fig1"]()
    results = {s.name: [_result(s.backbone, "vpt-at-block", s.task, 10.0 * int(s.row.split("@")[1]))]
               for s in plan.specs if s.task == "cub" and s.backbone != "sup_vitb16"}
    paths = plan.render(plan, results, tmp_path)
    cub = json.loads((tmp_path / "figures" / "insertion_cub.json").read_text())
    curves = {c["backbone"]: c for c in cub["curves"]}
    assert [r["test_top1"] for r in curves["mae_vitb16"]["runs"]] == [10.0 * k for k in range(1, 13)]
    assert all(r["test_top1"] is None for r in curves["sup_vitb16"]["runs"])  # not run: drawn as missing
    assert (tmp_path / "figures" / "insertion_kitti.png").is_file() and all(Path(p).is_file() for p in paths)


def test_fig2_fig9_images_and_weights(tmp_path):
    import numpy as np
    from PIL import Image
    from gapt.analysis.reconstruct import execute_reconstruct, plan_images
    from gapt.paper.plans import FGVC_FOLDERS, PLANS
    for task, n in (("cub", 150), ("flowers", 3)):
        folder = tmp_path / FGVC_FOLDERS[task] / "images"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / f"{i:04d}.jpg")
    two = plan_images("fig2", tmp_path)
    assert [p.name for p in two] == ["0000.jpg", "0001.jpg", "0000.jpg", "0001.jpg"]
    hundred = plan_images("fig9", tmp_path)
    assert len(hundred) == 100 and hundred[0].name == "0000.jpg" and hundred[-1].name == "0149.jpg"
    with pytest.raises(FileNotFoundError, match="sup_vitb16"):
        execute_reconstruct(PLANS["fig2"](), tmp_path / "out", tmp_path, {"mae_vitb16": "x"})


def test_reproduce_fig7_dry_run(capsys):
    assert main(["reproduce", "fig7", "--dry-run", "--weights", "mae.pth"]) == 0
    out = capsys.readouterr().out
    assert "ours-np24/cars" in out and "vpt-deep-np96/cars" in out


def test_render_fig4_panels_from_final_runs(tmp_path):
    import torch
    from conftest import tiny_model
    from gapt.paper.plans import PLANS
    plan = PLANS["fig4"]()
    assert {(s.backbone, s.task) for s in plan.specs} == {(b, t) for b in ("mae_vitb16", "mocov3_vitb16")
                                                          for t in ("nabirds", "cars", "ade20k")}
    for i, s in enumerate(plan.specs):
        folder = tmp_path / s.name / "final" / "seed42"
        folder.mkdir(parents=True)
        model = tiny_model(method="gated")
        with torch.no_grad():
            model.gate_logits.copy_(torch.tensor([float(i), -1.0, 1.0]))
        model.save_tuned(str(folder / "tuned.safetensors"))
        (folder / "results.json").write_text(json.dumps({"task": s.task, "backbone": s.backbone}))
    paths = plan.render(plan, {}, tmp_path)
    saved = json.loads((tmp_path / "figures" / "gates.json").read_text())
    assert sorted(p["task"] for p in saved["panels"]) == ["ade20k", "cars", "nabirds"]
    assert all(len(p["series"]) == 2 for p in saved["panels"])
    assert (tmp_path / "figures" / "gates_tasks.png").is_file() and all(Path(p).is_file() for p in paths)


def test_render_fig5_rows_and_first_image(tmp_path, monkeypatch):
    """Fig. 5 from two finished runs: frozen first, then + GATE, then + GATE + LT."""
    import numpy as np
    from PIL import Image
    from gapt.config import load_config
    from gapt.engine.trainer import train
    from gapt.analysis import attention as analysis_attention
    from gapt.paper.plans import PLANS
    plan = PLANS["fig5"]()
    assert [s.method for s in plan.specs] == ["gated", "gated+temperature"]
    small = ("backbone=test_mae_tiny weights=null image_size=32 num_prompts=2 train.epochs=1 train.warmup_epochs=0 "
             "train.batch_size=32 data.num_workers=0 device=cpu data.format=shapes data.name=count "
             "data.num_samples=32 method=gated").split()
    for s, lt in zip(plan.specs, ("false", "true")):
        train(load_config(None, small + [f"learn_temperature={lt}", f"out={tmp_path / s.name / 'final' / 'seed42'}"]))
    img = tmp_path / "data" / "b" / "x.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(f"data:\n  root: {tmp_path / 'data'}\n")
    assert analysis_attention.first_image(tmp_path / "cfg") == tmp_path / "data" / "a.png"
    monkeypatch.setattr(analysis_attention, "first_image", lambda run: img)
    plan.render(plan, {}, tmp_path)
    summary = json.loads(next((tmp_path / "figures").glob("attention_*.json")).read_text())
    assert summary["blocks"] == [1, 2, 4]  # the paper's blocks 3, 7, 12 of 12, on a 4-block backbone
    labels = [r["label"] for r in summary["rows"]]
    assert len(labels) == 3 and labels[0].startswith("frozen test_mae_tiny")
    assert "(gated)" in labels[1] and "(gated+LT)" in labels[2]


def test_reproduce_fig2_checks_weights_before_any_job(tmp_path, capsys):
    w = tmp_path / "mae.pth"
    w.write_bytes(b"x")
    assert main(["reproduce", "fig2", "--data-root", str(tmp_path), "--weights", f"mae_vitb16={w}",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "sup_vitb16" in err and "mocov3_vitb16" in err
    assert main(["reproduce", "fig2", "--data-root", str(tmp_path), "--weights", str(w)]) == 1
    assert "BACKBONE=FILE" in capsys.readouterr().err
    assert not (tmp_path / "o" / "jobs").exists()
