"""gapt report: grouping, means, paper columns, missing tasks, CSV, errors; gates plot/table."""
import csv
import io
import json
import math

import pytest

from gapt.paper.published import method_key, paper_number
from gapt.report.tables import build_report, collect_runs, write_report

VTAB_NATURAL = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
VTAB_SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
VTAB_STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"]

# SPEC section 7, typed again here.
SPEC_FGVC = """
mae_vitb16 vpt-shallow 42.15 69.15 43.38 77.07 57.43 57.84
mae_vitb16 vpt-deep 68.33 80.05 67.67 78.83 65.22 72.02
mae_vitb16 gated+temperature 70.56 78.55 71.70 78.90 67.26 73.39
mocov3_vitb16 vpt-shallow 79.05 90.47 71.91 81.97 72.92 79.26
mocov3_vitb16 vpt-deep 82.67 94.41 79.18 83.33 75.99 83.12
mocov3_vitb16 gated+temperature 82.86 93.71 79.02 83.37 76.02 83.00
"""
SPEC_VTAB = """
mae_vitb16 vpt-shallow 39.96 69.65 27.50 40.96
mae_vitb16 vpt-deep 36.02 60.61 26.57 37.22
mae_vitb16 gated+temperature 47.61 76.86 36.80 49.22
mocov3_vitb16 vpt-shallow 67.34 82.26 37.55 57.94
mocov3_vitb16 vpt-deep 70.27 83.04 42.38 61.22
mocov3_vitb16 gated+temperature 74.84 83.38 49.10 65.80
"""
SPEC_ADE = """
mae_vitb16 vpt-shallow 34.20 35.23
mae_vitb16 vpt-deep 37.76 38.80
mae_vitb16 gated 38.44 39.81
mocov3_vitb16 vpt-shallow 34.55 36.18
mocov3_vitb16 vpt-deep 35.50 37.15
mocov3_vitb16 gated 36.81 38.55
"""


def _spec_rows(text):
    for line in text.strip().splitlines():
        backbone, method, *numbers = line.split()
        yield backbone, method, [float(x) for x in numbers]


def write_run(root, name, *, backbone="mae_vitb16", method="gated", temp=True, benchmark="fgvc",
              task="cub", seed=42, final=True, metrics=None, prompt_init="random", num_prompts=100):
    d = root / name
    d.mkdir(parents=True)
    res = {"backbone": backbone, "method": method, "learn_temperature": temp, "num_prompts": num_prompts,
           "prompt_init": prompt_init, "benchmark": benchmark, "task": task, "seed": seed, "final": final,
           "metrics": metrics, "data": {}, "tuned_params": 1000, "train_time_s": 1.0}
    (d / "results.json").write_text(json.dumps(res))
    return d


def top1(x):
    """A run whose last epoch scored ``x`` (what reports show by default, the paper's protocol) and whose
    best-val epoch (3 of more) scored ``x + 0.5``."""
    return {"val_top1_best": x + 1, "best_epoch": 3, "test_top1": x + 0.5, "test_top1_best_val": x + 0.5,
            "test_top1_last": x, "selection": "best-val"}


def test_paper_numbers_match_spec():
    cols = ["cub", "flowers", "cars", "dogs", "nabirds", "mean"]
    for backbone, method, numbers in _spec_rows(SPEC_FGVC):
        for col, x in zip(cols, numbers):
            assert paper_number("fgvc", backbone, method, col) == x
    for backbone, method, numbers in _spec_rows(SPEC_VTAB):
        for col, x in zip(["natural", "specialized", "structured", "mean"], numbers):
            assert paper_number("vtab", backbone, method, col) == x
        assert paper_number("vtab", backbone, method, "dtd") is None  # no per-task numbers in SPEC
    for backbone, method, numbers in _spec_rows(SPEC_ADE):
        assert paper_number("ade20k", backbone, method, "mIoU") == numbers[0]
        assert paper_number("ade20k", backbone, method, "mIoU_ms") == numbers[1]
    # no paper number: other method keys, other benchmarks, the plain gated row on FGVC
    assert paper_number("fgvc", "mae_vitb16", "gated", "mean") is None
    assert paper_number("ade20k", "mae_vitb16", "gated+temperature", "mIoU") is None
    assert paper_number("fgvc", "mae_vitb16", "gated+temperature+prototype", "cub") is None
    assert paper_number("shapes", "mae_vitb16", "gated", "mean") is None
    with pytest.raises(ValueError, match="cubb"):
        paper_number("fgvc", "mae_vitb16", "vpt-deep", "cubb")


def test_method_key_rule():
    assert method_key("gated", True, "random") == "gated+temperature"
    assert method_key("gated", False, "random") == "gated"
    assert method_key("vpt-deep", False, "random") == "vpt-deep"
    assert method_key("vpt-shallow", True, "random") == "vpt-shallow+temperature"
    assert method_key("gated", True, "prototype") == "gated+temperature+prototype"
    assert method_key("linear", False, "random") == "linear"
    assert method_key("vpt-at-block", False, "random", insert_at_block=6) == "vpt@6"
    assert method_key("vpt-shallow", False, "spt") == "vpt-shallow+spt"  # SPT and VIPAMIN are rows of their own
    assert method_key("vpt-deep", False, "vipamin") == "vpt-deep+vipamin"


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # FGVC, MAE gated+temperature: all five datasets, several seeds on some
    for seed, x in [(1, 70.0), (2, 71.0), (3, 73.0)]:
        write_run(root, f"fgvc/cub-s{seed}", task="cub", seed=seed, metrics=top1(x))
    write_run(root, "fgvc/flowers", task="flowers", seed=1, metrics=top1(80.0))
    write_run(root, "fgvc/cars-s1", task="cars", seed=1, metrics=top1(60.0))
    write_run(root, "fgvc/cars-s2", task="cars", seed=2, metrics=top1(62.0))
    write_run(root, "fgvc/dogs", task="dogs", seed=1, metrics=top1(78.0))
    write_run(root, "fgvc/nabirds", task="nabirds", seed=1, metrics=top1(65.0))
    # a sweep trial (not final) for cub: in the sweep's trials/ folder
    write_run(root, "sweep/cub/trials/lr0.5", task="cub", seed=42, final=False, metrics=top1(50.0))
    # FGVC, MoCo v3 vpt-deep: nabirds missing
    for t, x in zip(["cub", "flowers", "cars", "dogs"], [80.0, 90.0, 75.0, 82.0]):
        write_run(root, f"moco-deep/{t}", backbone="mocov3_vitb16", method="vpt-deep", temp=False,
                  task=t, seed=1, metrics=top1(x), num_prompts=10)
    # VTAB, MoCo v3 gated+temperature: all 19 tasks
    for i, t in enumerate(VTAB_NATURAL + VTAB_SPECIALIZED + VTAB_STRUCTURED):
        write_run(root, f"vtab/moco/{t}", backbone="mocov3_vitb16", benchmark="vtab", task=t, seed=1,
                  metrics=top1(40.0 + i), num_prompts=1 + i)
    # VTAB, MAE vpt-shallow: every task but kitti (structured)
    for i, t in enumerate(VTAB_NATURAL + VTAB_SPECIALIZED + VTAB_STRUCTURED):
        if t != "kitti":
            write_run(root, f"vtab/mae/{t}", benchmark="vtab", method="vpt-shallow", temp=False, task=t,
                      seed=1, metrics=top1(30.0 + i))
    # ADE20K, MAE gated (no temperature): mIoU_ms only on one seed
    write_run(root, "seg/s1", method="gated", temp=False, benchmark="ade20k", task="ade20k", seed=1,
              metrics={"mIoU": 38.0, "mAcc": 50.0, "aAcc": 80.0, "mIoU_ms": 39.5})
    write_run(root, "seg/s2", method="gated", temp=False, benchmark="ade20k", task="ade20k", seed=2,
              metrics={"mIoU": 39.0, "mAcc": 51.0, "aAcc": 81.0})
    # another benchmark
    write_run(root, "misc/shapes", benchmark="shapes", task="shapes", seed=7, metrics=top1(95.0))
    # folders without results.json are skipped
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "fgvc" / "cub-s1" / "checkpoints").mkdir()
    return root


def test_collect_runs_walks_recursively(runs_dir):
    runs = collect_runs([runs_dir, runs_dir / "fgvc"])  # overlapping paths: each run once
    assert len(runs) == 8 + 1 + 4 + 19 + 18 + 2 + 1
    assert all("run_dir" in r for r in runs)
    assert collect_runs(runs_dir / "fgvc" / "cub-s1")[0]["seed"] == 1
    with pytest.raises(FileNotFoundError):
        collect_runs(runs_dir / "nope")


def test_per_task_mean_std_and_fgvc_mean(runs_dir):
    rep = build_report(collect_runs(runs_dir), only_final=True)
    cub = rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub")
    m = (70.0 + 71.0 + 73.0) / 3
    s = math.sqrt(((70.0 - m) ** 2 + (71.0 - m) ** 2 + (73.0 - m) ** 2) / 2)
    assert cub["mean"] == pytest.approx(m) and cub["std"] == pytest.approx(s)
    assert cub["n_seeds"] == 3 and cub["seeds"] == "1 2 3"
    assert cub["paper"] == 70.56 and cub["diff"] == pytest.approx(m - 70.56)
    flowers = rep.task("fgvc", "mae_vitb16", "gated+temperature", "flowers")
    assert flowers["std"] is None and flowers["n_seeds"] == 1
    cars = rep.task("fgvc", "mae_vitb16", "gated+temperature", "cars")
    assert cars["mean"] == pytest.approx(61.0) and cars["std"] == pytest.approx(math.sqrt(2.0))

    fgvc_mean = (m + 80.0 + 61.0 + 78.0 + 65.0) / 5
    row = rep.summary("fgvc", "mae_vitb16", "gated+temperature", "mean")
    assert row["mean"] == pytest.approx(fgvc_mean)
    assert row["paper"] == 73.39 and row["diff"] == pytest.approx(fgvc_mean - 73.39)
    assert row["present"] == "5/5"


def test_sweep_trials_are_left_out_unless_asked_and_never_pooled_with_finals(runs_dir):
    runs = collect_runs(runs_dir)
    default = build_report(runs)
    cub = default.task("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert cub["n_seeds"] == 3 and cub["mean"] == pytest.approx((70 + 71 + 73) / 3) and cub["final"] == "yes"
    assert default.trials_left_out == 1 and "--include-trials" in default.markdown()
    with_trials = build_report(runs, include_trials=True)
    rows = with_trials.tasks("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert sorted((r["n_seeds"], r["final"]) for r in rows if r["n_seeds"]) == [(1, "no"), (3, "yes")]
    trial = with_trials.task("fgvc", "mae_vitb16", "gated+temperature", "cub", final=False)
    assert trial["mean"] == 50.0 and "trial" in trial["settings"]
    assert with_trials.num_runs == default.num_runs + 1


def test_missing_task_makes_dependent_means_missing(runs_dir):
    rep = build_report(collect_runs(runs_dir), only_final=True)
    row = rep.summary("fgvc", "mocov3_vitb16", "vpt-deep", "mean")
    assert row["mean"] is None and row["diff"] is None
    assert row["paper"] == 83.12
    assert row["present"] == "4/5"
    assert row["mean_over_present"] == pytest.approx((80 + 90 + 75 + 82) / 4)
    assert rep.task("fgvc", "mocov3_vitb16", "vpt-deep", "cub")["paper"] == 82.67
    nab = rep.task("fgvc", "mocov3_vitb16", "vpt-deep", "nabirds")  # listed, as missing
    assert nab["mean"] is None and nab["n_seeds"] == 0 and nab["paper"] == 75.99 and nab["diff"] is None
    kitti = rep.task("vtab", "mae_vitb16", "vpt-shallow", "kitti")
    assert kitti["mean"] is None and kitti["group"] == "structured"

    # MAE vpt-shallow VTAB: kitti missing -> Structured and 19-task mean missing, others present
    ordered = VTAB_NATURAL + VTAB_SPECIALIZED + VTAB_STRUCTURED
    acc = {t: 30.0 + i for i, t in enumerate(ordered)}
    nat = rep.summary("vtab", "mae_vitb16", "vpt-shallow", "natural")
    assert nat["mean"] == pytest.approx(sum(acc[t] for t in VTAB_NATURAL) / 7)
    assert nat["paper"] == 39.96 and nat["diff"] == pytest.approx(nat["mean"] - 39.96)
    spec = rep.summary("vtab", "mae_vitb16", "vpt-shallow", "specialized")
    assert spec["mean"] == pytest.approx(sum(acc[t] for t in VTAB_SPECIALIZED) / 4)
    struct = rep.summary("vtab", "mae_vitb16", "vpt-shallow", "structured")
    assert struct["mean"] is None and struct["present"] == "7/8" and struct["paper"] == 27.50
    mean19 = rep.summary("vtab", "mae_vitb16", "vpt-shallow", "mean")
    assert mean19["mean"] is None and mean19["present"] == "18/19" and mean19["paper"] == 40.96

    md = rep.markdown()
    line = next(l for l in md.splitlines() if "mocov3_vitb16 | vpt-deep | mean (5 datasets)" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "—" and cells[4] == "83.12" and cells[5] == "—" and cells[6] == "4/5"
    line = next(l for l in md.splitlines() if "mocov3_vitb16 | vpt-deep | nabirds" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "—" and cells[5] == "0" and cells[-2:] == ["75.99", "—"]


def test_vtab_group_means_and_19_task_mean(runs_dir):
    rep = build_report(collect_runs(runs_dir))
    ordered = VTAB_NATURAL + VTAB_SPECIALIZED + VTAB_STRUCTURED
    acc = {t: 40.0 + i for i, t in enumerate(ordered)}
    expected = {
        "natural": (sum(acc[t] for t in VTAB_NATURAL) / 7, 74.84),
        "specialized": (sum(acc[t] for t in VTAB_SPECIALIZED) / 4, 83.38),
        "structured": (sum(acc[t] for t in VTAB_STRUCTURED) / 8, 49.10),
        "mean": (sum(acc.values()) / 19, 65.80),  # mean of 19 tasks, not of the 3 groups
    }
    for name, (ours, paper) in expected.items():
        row = rep.summary("vtab", "mocov3_vitb16", "gated+temperature", name)
        assert row["mean"] == pytest.approx(ours), name
        assert row["paper"] == paper and row["diff"] == pytest.approx(ours - paper)
    assert rep.task("vtab", "mocov3_vitb16", "gated+temperature", "kitti")["group"] == "structured"
    assert rep.task("vtab", "mocov3_vitb16", "gated+temperature", "dtd")["paper"] is None


def test_segmentation_and_other_benchmarks(runs_dir):
    rep = build_report(collect_runs(runs_dir))
    ss = rep.task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU")
    assert ss["mean"] == pytest.approx(38.5) and ss["n_seeds"] == 2
    assert ss["std"] == pytest.approx(math.sqrt(0.5))
    assert ss["paper"] == 38.44 and ss["diff"] == pytest.approx(38.5 - 38.44)
    ms = rep.task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU_ms")
    assert ms["mean"] == pytest.approx(39.5) and ms["n_seeds"] == 1 and ms["paper"] == 39.81
    shapes = rep.task("shapes", "mae_vitb16", "gated+temperature", "shapes")
    assert shapes["mean"] == 95.0 and shapes["paper"] is None
    assert not [r for r in rep.summary_rows if r["benchmark"] in ("ade20k", "shapes")]
    md = rep.markdown()
    assert "ADE20K" in md and "shapes" in md and "38.44" in md and "39.81" in md


def test_csv_and_write(runs_dir, tmp_path):
    out = tmp_path / "out"
    rep = write_report([runs_dir], out)
    text = (out / "report.csv").read_text()
    assert text == rep.csv()
    assert (out / "report.md").read_text() == rep.markdown()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(rep.task_rows) + len(rep.summary_rows)
    cub = next(r for r in rows if r["section"] == "task" and r["benchmark"] == "fgvc"
               and r["method"] == "gated+temperature" and r["name"] == "cub")
    assert float(cub["mean"]) == pytest.approx(214 / 3, abs=1e-4)
    assert float(cub["paper"]) == 70.56 and cub["n_seeds"] == "3"
    flowers = next(r for r in rows if r["section"] == "task" and r["method"] == "gated+temperature"
                   and r["name"] == "flowers")
    assert flowers["std"] == ""  # one seed: no std
    deep = next(r for r in rows if r["section"] == "summary" and r["method"] == "vpt-deep"
                and r["benchmark"] == "fgvc" and r["name"] == "mean")
    assert deep["mean"] == "" and deep["diff"] == "" and float(deep["paper"]) == 83.12


def test_bad_results_json(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        collect_runs(tmp_path)
    assert str(bad / "results.json") in str(e.value)

    (bad / "results.json").write_text(json.dumps({"backbone": "mae_vitb16", "method": "gated"}))
    with pytest.raises(ValueError, match="'learn_temperature'") as e:
        collect_runs(tmp_path)
    assert str(bad / "results.json") in str(e.value)

    bad.joinpath("results.json").unlink()
    d = write_run(tmp_path, "nometric", metrics={"val_top1_best": 3.0})
    with pytest.raises(ValueError, match=r"metrics\.test_top1") as e:
        collect_runs(tmp_path)
    assert str(d / "results.json") in str(e.value)

    with pytest.raises(ValueError, match="'task'"):
        build_report([{"backbone": "b", "method": "gated", "learn_temperature": False,
                       "prompt_init": "random", "benchmark": "fgvc", "seed": 1, "metrics": {}}])


def _gate_entries():
    gate_a = [0.25, 0.5, 0.125, 0.75, 0.0625, 0.375, 0.625, 0.875, 0.3125, 0.4375, 0.5625]
    ratio_a = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.45]
    temp_a = [1.0, 1.5, 2.25, 0.5, 0.75, 1.125, 1.25, 1.375, 0.875, 0.625, 3.5, 4.25]
    gate_b = [0.0067] * 11
    ratio_b = [1 / 11] * 11
    return [("mae-cub", {"gate": gate_a, "selection_ratio": ratio_a, "inserted_prompt_weight": 0.0123,
                         "temperature": temp_a}),
            ("moco-cub", {"gate": gate_b, "selection_ratio": ratio_b, "inserted_prompt_weight": 0.9286,
                          "temperature": None})]


def test_gates_plot_and_table(tmp_path):
    from gapt.analysis.gates_plot import gates_table, plot_gates
    entries = _gate_entries()
    png = plot_gates(entries, tmp_path / "fig" / "gates.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    table = gates_table(entries)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 12 + 1  # header, rule, 12 blocks, inserted-prompt weight
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["block", "mae-cub gate", "mae-cub r_l", "mae-cub temperature"]
    row3 = [c.strip() for c in lines[2 + 2].strip("|").split("|")]
    assert row3[:4] == ["3", "0.125", "0.03", "2.25"]
    assert row3[4:] == ["0.0067", "0.09091", "—"]
    last_block = [c.strip() for c in lines[2 + 11].strip("|").split("|")]
    assert last_block[:4] == ["12", "—", "—", "4.25"]
    assert "0.0123" in lines[-1] and "0.9286" in lines[-1]

    with pytest.raises(ValueError, match="selection ratios"):
        gates_table([("x", {"gate": [0.1, 0.2], "selection_ratio": [1.0], "inserted_prompt_weight": 0.5})])


# -- rows keyed by settings, beside Tables 4, 6, 7, 8 (SPEC §8 values typed here) -------------------
SPEC_TABLE7 = {  # prompts in total -> (VPT-deep row, Ours row), CUB Flowers Cars Dogs NABirds mean
    24: ((59.68, 67.51, 57.68, 77.91, 54.65, 63.49), (65.26, 73.80, 66.09, 75.72, 62.10, 68.59)),
    48: ((66.43, 71.31, 64.06, 78.89, 60.62, 68.26), (69.00, 74.71, 70.29, 76.77, 63.73, 70.90)),
    96: ((70.85, 76.29, 67.63, 78.38, 62.99, 71.23), (71.40, 75.96, 72.16, 77.81, 66.25, 72.72)),
}
FGVC = ["cub", "flowers", "cars", "dogs", "nabirds"]


def settings_run(root, name, **kw):
    extra = {k: kw.pop(k) for k in ("lr", "gate_type", "gate_temperature", "batch_size", "epochs",
                                    "backbone_params", "tuned_params") if k in kw}
    d = write_run(root, name, **kw)
    res = json.loads((d / "results.json").read_text())
    res.update(extra)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_rows_pool_only_runs_that_differ_in_seed(tmp_path):
    root = tmp_path / "runs"
    for seed, x in [(1, 60.0), (2, 62.0)]:
        settings_run(root, f"np4-s{seed}", num_prompts=4, seed=seed, metrics=top1(x), lr=0.1)
    settings_run(root, "np100", num_prompts=100, seed=1, metrics=top1(70.0), lr=0.1)
    settings_run(root, "np100-lr1", num_prompts=100, seed=1, metrics=top1(20.0), lr=1.0)
    rep = build_report(collect_runs(root))
    rows = rep.tasks("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert sorted((r["settings"], r["mean"], r["n_seeds"]) for r in rows) == [
        ("np=100 gate=soft lr=0.1 final", 70.0, 1), ("np=100 gate=soft lr=1 final", 20.0, 1),
        ("np=4 gate=soft lr=0.1 final", 61.0, 2)]
    md = rep.markdown()
    assert "np=4 gate=soft lr=0.1 final" in md and "np=100 gate=soft lr=1 final" in md
    # the 100-prompt rows meet Table 1's row, the 4-prompt row no paper row
    assert rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub", num_prompts=100)["paper"] == 70.56
    assert rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub", num_prompts=4)["paper"] is None
    # two lrs for cub in one summary group: no FGVC mean, and a note says why
    assert any("different settings" in n for n in rep.notes)
    assert rep.summary("fgvc", "mae_vitb16", "gated+temperature", "mean", num_prompts=100)["mean"] is None


def test_report_beside_tables_4_6_7_8_with_total_params(tmp_path):
    root = tmp_path / "runs"
    for n, (deep, ours) in SPEC_TABLE7.items():
        for i, task in enumerate(FGVC):
            settings_run(root, f"t7/deep{n}/{task}", method="vpt-deep", temp=False, task=task, num_prompts=n // 12,
                         metrics=top1(50.0 + i), backbone_params=1000, tuned_params=10)
            settings_run(root, f"t7/ours{n}/{task}", task=task, num_prompts=n, metrics=top1(60.0 + i))
    for task in ("cub", "flowers"):
        settings_run(root, f"t4/{task}", task=task, gate_type="hard", gate_temperature=1.0, metrics=top1(55.0))
        settings_run(root, f"t8/l-{task}", backbone="mae_vitl16", task=task, num_prompts=48, metrics=top1(71.0))
        settings_run(root, f"t8/s-{task}", backbone="mocov3_vits16", method="vpt-shallow", temp=False, task=task,
                     num_prompts=48, metrics=top1(66.0))
    settings_run(root, "t6/ours", method="gated", temp=False, benchmark="ade20k", task="ade20k", num_prompts=24,
                 metrics={"mIoU": 37.0, "mIoU_ms": 38.0})
    rep = build_report(collect_runs(root))
    for n, (deep, ours) in SPEC_TABLE7.items():
        for i, task in enumerate(FGVC):
            d = rep.task("fgvc", "mae_vitb16", "vpt-deep", task, num_prompts=n // 12)
            o = rep.task("fgvc", "mae_vitb16", "gated+temperature", task, num_prompts=n)
            assert (d["paper"], d["paper_table"], o["paper"], o["paper_table"]) == (deep[i], "table7", ours[i], "table7")
            assert d["diff"] == pytest.approx(50.0 + i - deep[i])
        mean = rep.summary("fgvc", "mae_vitb16", "gated+temperature", "mean", num_prompts=n)
        assert mean["paper"] == ours[5] and mean["mean"] == pytest.approx(62.0)
        deep_mean = rep.summary("fgvc", "mae_vitb16", "vpt-deep", "mean", num_prompts=n // 12)
        assert deep_mean["total_params"] == pytest.approx((1000 + 5 * 10) / 1000)
    hard = rep.task("fgvc", "mae_vitb16", "gated+temperature", "flowers", gate_type="hard")
    assert (hard["paper"], hard["paper_table"]) == (76.55, "table4") and "gate=hard t=1" in hard["settings"]
    assert rep.task("fgvc", "mae_vitl16", "gated+temperature", "cub")["paper"] == 72.99
    assert rep.task("fgvc", "mocov3_vits16", "vpt-shallow", "flowers")["paper"] == 84.65
    assert rep.task("fgvc", "mae_vitl16", "gated+temperature", "cub")["paper_table"] == "table8"
    seg = rep.task("ade20k", "mae_vitb16", "gated", "ade20k", metric="mIoU_ms")
    assert (seg["paper"], seg["paper_table"]) == (39.23, "table6")


def test_table1_total_params_column(tmp_path):
    root = tmp_path / "runs"
    for task in FGVC:
        settings_run(root, task, task=task, num_prompts=100, metrics=top1(70.0), backbone_params=85_798_656,
                     tuned_params=77_000 + 769 * 100)
    mean = build_report(collect_runs(root)).summary("fgvc", "mae_vitb16", "gated+temperature", "mean")
    assert mean["paper_total_params"] == 1.02
    assert mean["total_params"] == pytest.approx(1 + 5 * (77_000 + 76_900) / 85_798_656)


def test_cli_report_with_no_runs_fails_and_keeps_the_old_report(tmp_path, capsys):
    from gapt.cli import main
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("old")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(out)]) == 1
    assert "no runs" in capsys.readouterr().err and (out / "report.md").read_text() == "old"
    write_run(empty, "sweep/trials/lr0.5", final=False, metrics=top1(50.0))
    assert main(["report", str(empty), "--out", str(out)]) == 1
    assert "--include-trials" in capsys.readouterr().err and (out / "report.md").read_text() == "old"
    assert main(["report", str(empty), "--out", str(out), "--include-trials"]) == 0
    assert "trial" in (out / "report.md").read_text()


def test_duplicate_seed_hint_names_the_flag(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", seed=1, metrics=top1(50.0))
    write_run(root, "b", seed=1, metrics=top1(52.0))
    rep = build_report(collect_runs(root))
    assert any("--only-final" in n and "only_final" not in n.replace("--only-final", "") for n in rep.notes)


# -- which epoch (issue 25): last by default, best-val on request, the paper always beside the last ------
def test_select_last_by_default_best_val_on_request_and_paper_columns_at_the_last_epoch(tmp_path):
    root = tmp_path / "runs"
    # FGVC finals (val held out): last epoch 60 + i, best-val epoch 65 + i
    for i, task in enumerate(FGVC):
        write_run(root, f"fgvc/{task}", task=task, seed=42,
                  metrics={"val_top1_best": 80.0, "best_epoch": 7, "test_top1": 65.0 + i, "test_top1_best_val": 65.0 + i,
                           "test_top1_last": 60.0 + i, "selection": "best-val", "selected_epoch": 7})
    last = rep_last = build_report(collect_runs(root))
    cub = last.task("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert (cub["mean"], cub["mean_last_epoch"], cub["select"]) == (60.0, 60.0, "last")
    assert cub["diff"] == pytest.approx(60.0 - 70.56)
    mean = last.summary("fgvc", "mae_vitb16", "gated+temperature", "mean")
    assert mean["mean"] == pytest.approx(62.0) and mean["diff"] == pytest.approx(62.0 - 73.39)
    md = rep_last.markdown()
    assert "test top-1 of the last epoch" in md and "ours (last epoch)" in md and "best-val epoch)" not in md

    bv = build_report(collect_runs(root), select="best-val")
    cub = bv.task("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert (cub["mean"], cub["mean_last_epoch"], cub["select"]) == (65.0, 60.0, "best-val")
    assert cub["diff"] == pytest.approx(60.0 - 70.56)  # the paper is compared with the last epoch only
    mean = bv.summary("fgvc", "mae_vitb16", "gated+temperature", "mean")
    assert mean["mean"] == pytest.approx(67.0) and mean["mean_last_epoch"] == pytest.approx(62.0)
    assert mean["diff"] == pytest.approx(62.0 - 73.39)
    md = bv.markdown()
    header = next(l for l in md.splitlines() if l.startswith("| backbone | method | task"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[3] == "ours (best-val epoch)" and cols[-3:] == ["ours (last epoch)", "paper",
                                                               "diff (last epoch − paper)"]
    line = next(l for l in md.splitlines() if l.startswith("| mae_vitb16 | gated+temperature | cub"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert (cells[3], cells[-3], cells[-2], cells[-1]) == ("65.00", "60.00", "70.56", f"{60.0 - 70.56:+.2f}")
    rows = list(csv.DictReader(io.StringIO(bv.csv())))
    cub_csv = next(r for r in rows if r["section"] == "task" and r["name"] == "cub")
    assert (float(cub_csv["mean"]), float(cub_csv["mean_last_epoch"]), cub_csv["select"]) == (65.0, 60.0, "best-val")
    with pytest.raises(ValueError, match="best-val"):
        build_report(collect_runs(root), select="best")


def test_runs_without_held_out_val_never_report_a_best_val_epoch(tmp_path):
    root = tmp_path / "runs"
    # a VTAB final run written before issue 25: test_top1 was chosen by val on training images
    d = write_run(root, "vtab/dtd", benchmark="vtab", task="dtd", seed=42,
                  metrics={"val_top1_best": 99.0, "best_epoch": 2, "test_top1": 55.0, "test_top1_last": 50.0})
    res = json.loads((d / "results.json").read_text())
    res["val_held_out"] = False
    (d / "results.json").write_text(json.dumps(res))
    # and one written now (selection "last", no best-val keys)
    write_run(root, "vtab/eurosat", benchmark="vtab", task="eurosat", seed=42,
              metrics={"test_top1": 70.0, "test_top1_last": 70.0, "selection": "last", "selected_epoch": 100})
    for select in ("last", "best-val"):
        rep = build_report(collect_runs(root), select=select)
        assert rep.task("vtab", "mae_vitb16", "gated+temperature", "dtd")["mean"] == 50.0, select
        assert rep.task("vtab", "mae_vitb16", "gated+temperature", "eurosat")["mean"] == 70.0, select


def test_older_results_without_the_last_epoch_are_named_not_mixed(tmp_path):
    root = tmp_path / "runs"
    a = write_run(root, "a", task="cub", seed=1, metrics={"val_top1_best": 80.0, "best_epoch": 7, "test_top1": 66.0})
    b = write_run(root, "b", task="flowers", seed=1, metrics={"val_top1_best": 80.0, "best_epoch": 100,
                                                              "test_top1": 77.0})
    for d in (a, b):  # b's best epoch was the last: its test_top1 is the last epoch's
        res = json.loads((d / "results.json").read_text())
        res["epochs"] = 100
        (d / "results.json").write_text(json.dumps(res))
    rep = build_report(collect_runs(root))
    assert rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub")["mean"] is None
    assert rep.task("fgvc", "mae_vitb16", "gated+temperature", "flowers")["mean"] == 77.0
    assert any("1 run(s) record no test top-1 for the last epoch" in n and str(root / "a") in n for n in rep.notes)
    bv = build_report(collect_runs(root), select="best-val")
    assert bv.task("fgvc", "mae_vitb16", "gated+temperature", "cub")["mean"] == 66.0 and not bv.notes


def test_plain_runs_are_reported_only_sweep_trials_left_out(tmp_path, capsys):
    """`gapt report RUN1 RUN2` on two plain runs (data.final=false, the default) reports them."""
    from gapt.cli import main
    root = tmp_path / "runs"
    a = write_run(root, "run1", seed=1, final=False, metrics=top1(60.0))
    b = write_run(root, "run2", seed=2, final=False, metrics=top1(62.0))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    assert "no runs" not in capsys.readouterr().err
    rep = build_report(collect_runs([a, b]))
    cub = rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert (cub["mean"], cub["n_seeds"], cub["final"]) == (61.0, 2, "no") and rep.trials_left_out == 0
    assert "data.final=false" in cub["settings"] and "trial" not in cub["settings"]
    # a sweep's trials/ folder holds trials: left out, and never pooled with plain runs of the same settings
    write_run(root, "sweep/trials/lr0.1", seed=3, final=False, metrics=top1(10.0))
    rep = build_report(collect_runs(root))
    assert rep.trials_left_out == 1 and rep.task("fgvc", "mae_vitb16", "gated+temperature", "cub")["mean"] == 61.0
    rows = build_report(collect_runs(root), include_trials=True).tasks("fgvc", "mae_vitb16", "gated+temperature", "cub")
    assert sorted((r["mean"], r["n_seeds"]) for r in rows if r["n_seeds"]) == [(10.0, 1), (61.0, 2)]
    assert any("trial" in r["settings"].split() for r in rows if r["mean"] == 10.0)


def test_table8_vpt_deep_on_vit_l_is_two_prompts_per_block(tmp_path):
    root = tmp_path / "runs"
    settings_run(root, "l-deep2", backbone="mae_vitl16", method="vpt-deep", temp=False, num_prompts=2,
                 metrics=top1(70.0))
    settings_run(root, "l-deep4", backbone="mae_vitl16", method="vpt-deep", temp=False, num_prompts=4,
                 task="flowers", metrics=top1(60.0))
    settings_run(root, "s-deep4", backbone="mocov3_vits16", method="vpt-deep", temp=False, num_prompts=4,
                 metrics=top1(72.0))
    rep = build_report(collect_runs(root))
    deep_l = rep.task("fgvc", "mae_vitl16", "vpt-deep", "cub")
    assert (deep_l["paper"], deep_l["paper_table"]) == (70.54, "table8")  # 24 blocks x 2 = 48 prompts
    assert rep.task("fgvc", "mae_vitl16", "vpt-deep", "flowers", num_prompts=4)["paper"] is None  # 96: not Table 8
    assert rep.task("fgvc", "mocov3_vits16", "vpt-deep", "cub")["paper"] == 73.18  # 12 blocks x 4 = 48


def test_runs_of_one_part_with_other_part_settings_are_not_pooled():
    """Two LoRA ranks (or Fourier fractions) are two rows; their settings cell names the part's key."""
    from gapt.report.collect import run_settings, settings_text
    base = {"backbone": "mae_vitb16", "method": "lora", "learn_temperature": False, "prompt_init": "random",
            "benchmark": "vtab", "task": "dtd", "seed": 42, "final": True, "lr": 0.001,
            "lora_alpha": 8.0, "lora_targets": "qkv", "fourier_fraction": 1.0}
    r8, r4 = run_settings({**base, "lora_rank": 8}), run_settings({**base, "lora_rank": 4})
    assert r8 != r4
    assert "lora_rank=8" in settings_text(r8) and "fourier_fraction" not in settings_text(r8)  # not a vfpt run
    vfpt = run_settings({**base, "method": "vfpt", "lora_rank": 8})
    assert ("fourier_fraction", 1.0) in vfpt and not any(k == "lora_rank" for k, _ in vfpt)
