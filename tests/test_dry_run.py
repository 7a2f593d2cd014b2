"""`gapt reproduce --dry-run`: the inputs and whether they are there, the runs, their work in images processed
(epochs and ADE20K iterations never added), FLOPs checked against torch's own FLOP counter, the time estimate,
and the DIP figures' jobs (fig2, fig9, fig10, fig11)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import conftest  # noqa: F401 - registers the tiny backbones
from conftest import tiny_model
from gapt.cli import main


def counted_flops(fn) -> int:
    """torch.utils.flop_counter's count of what ``fn`` runs (matmuls, convolutions, their gradients), with
    attention on the math backend: torch's counter does not see inside the fused CPU attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- FLOPs against torch's counter ----------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("gated", {"learn_temperature": True}), ("vpt-deep", {}),
                                          ("vpt-shallow", {}), ("vpt-at-block", {"insert_at_block": 3}),
                                          ("linear", {})])
def test_vit_flops_equal_torch_counter(method, extra):
    from gapt.paper.workload import backbone_dims, vit_flops
    model = tiny_model(method=method, num_prompts=3, num_classes=5, **extra).eval()
    x = torch.randn(2, 3, 32, 32)
    dims = backbone_dims("test_mae_tiny")
    k = extra.get("insert_at_block", 1)

    def train_step():
        model(x).sum().backward()
    assert counted_flops(train_step) == 2 * vit_flops(dims, (4, 4), 3, method, k, classes=5)
    # forward only (no backward; torch's counter trips on no_grad here)
    assert counted_flops(lambda: model(x)) == 2 * vit_flops(dims, (4, 4), 3, method, k, classes=5, train=False)


def test_reference_image_is_a_vitb16_training_step():
    """The dry run's unit: ViT-B/16, 224 px, 100 prompts, gated, 100 classes, forward + backward (meta tensors:
    shapes only, no arithmetic)."""
    from gapt import build_model
    from gapt.paper.workload import reference_flops
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = build_model("mae_vitb16", method="gated", num_prompts=100, num_classes=100, weights=None)
        x = torch.empty(1, 3, 224, 224)
    model.eval()
    assert counted_flops(lambda: model(x).sum().backward()) == reference_flops() == 110_889_252_864


def test_ade20k_crop_and_window_flops_equal_torch_counter():
    """The ADE20K preset's model (prompted ViT-B/16 + SETR-PUP main and auxiliary heads), on meta tensors: one
    training crop forward + backward, and evaluation windows of three sizes (one not a multiple of 16)."""
    from gapt.config import load_config
    from gapt.paper.plans import PRESETS
    from gapt.paper.workload import backbone_dims, seg_crop_flops, seg_window_flops
    from gapt.seg.model import build_seg_model
    cfg = load_config(str(PRESETS / "ade20k/mae_vitb16.yaml"), ["data.root=/x", "weights=null"])
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = build_seg_model(cfg, 150)
        crop = torch.empty(1, 3, 512, 512)
    dims = backbone_dims(cfg.backbone)
    model.train()
    assert counted_flops(lambda: sum(o.sum() for o in model(crop).values()).backward()) == seg_crop_flops(cfg, dims)
    model.eval()
    for hw in ((512, 341), (256, 342), (512, 512)):
        window = torch.empty(1, 3, *hw, device="meta")
        assert counted_flops(lambda w=window: model(w)) == seg_window_flops(cfg, dims, hw), hw


def test_dip_step_flops_equal_torch_counter():
    from gapt.analysis.dip import SkipGenerator, _normalise, block_tokens
    from gapt.analysis.reconstruct import dip_step_flops, generator_flops
    from gapt.model.build import build_backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = build_backbone("test_mae_tiny", None, image_size=32, random_seed=0)[0].eval().requires_grad_(False)
    net = SkipGenerator(8, 8, 4, 3).train()
    z = torch.rand(1, 8, 32, 32)
    target = torch.randn(1, 17, 32)
    assert counted_flops(lambda: net(z)) == generator_flops(32, 8, 8, 4, 3)

    def step():
        ((block_tokens(vit, _normalise(net(z)), 3) - target) ** 2).mean().backward()
    opts = dict(image_size=32, input_channels=8, channels=8, skip_channels=4, scales=3)
    assert counted_flops(step) == dip_step_flops("test_mae_tiny", 3, opts)


# -- the dry run of a table -----------------------------------------------------------------------
def fgvc_splits(folder, sizes):
    folder.mkdir(parents=True)
    for split, n in zip(("train", "val", "test"), sizes):
        (folder / f"{split}.json").write_text(json.dumps({f"{split}/{i}.jpg": i % 3 + 1 for i in range(n)}))


def test_table4_dry_run_lists_inputs_runs_work_and_time(tmp_path, capsys):
    from gapt.paper.workload import backbone_dims, reference_flops, vit_flops
    data = tmp_path / "data"
    fgvc_splits(data / "CUB_200_2011", (10, 4, 6))
    weights = tmp_path / "mae.pth"
    weights.write_bytes(b"x")
    args = ["reproduce", "table4", "--dry-run", "--data-root", str(data), "--weights", str(weights),
            "--out", str(tmp_path / "o"), "train.epochs=3", "--time-per-image", "0.5"]
    assert main(args + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["datasets"] == [{"benchmark": "fgvc", "task": "cub", "folder": str(data / "CUB_200_2011"),
                                 "present": True},
                                {"benchmark": "fgvc", "task": "flowers", "folder": str(data / "OxfordFlower"),
                                 "present": False}]
    assert info["weights"][0]["backbone"] == "mae_vitb16" and info["weights"][0]["present"]
    # per run: train x 3 epochs; val x 3 epochs + test x 2 (best-val and last state: val is held out)
    per_run = {"cub": (10 * 3, 4 * 3 + 6 * 2), "flowers": (1020 * 3, 1020 * 3 + 6149 * 2)}  # flowers: VPT's sizes
    dims = backbone_dims("mae_vitb16")
    total = 0
    for s in info["specs"]:
        # 7 lrs (the seed-42 final reuses the chosen trial: FGVC's final is the same run), or 1 final
        runs = 7 if s["name"].startswith("mae_vitb16/vpt-shallow") else 1
        assert s["runs"] == runs and s["epochs"] == 3
        train, evals = per_run[s["task"]]
        w = s["work"]
        assert (w["train"], w["eval"], w["unit_train"]) == (runs * train, runs * evals, "images")
        assert ("split files" in w["sizes_from"]) == (s["task"] == "cub")
        method = "vpt-shallow" if "vpt-shallow" in s["name"] else "gated"
        flops = runs * (train * vit_flops(dims, (14, 14), 100, method, classes=100)
                        + evals * vit_flops(dims, (14, 14), 100, method, classes=100, train=False))
        assert w["flops"] == flops
        assert s["time_s"] == pytest.approx(flops / reference_flops() * 0.5)
        total += flops
    assert (info["runs"], info["epochs"], info["iterations"]) == (18, 54, 0)
    assert info["flops"] == total and info["time_s"] == pytest.approx(total / reference_flops() * 0.5)
    assert info["work"] == {"train_images": sum(s["work"]["train"] for s in info["specs"]),
                            "eval_images": sum(s["work"]["eval"] for s in info["specs"])}

    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"dataset fgvc cub: {data / 'CUB_200_2011'} (present)" in text
    assert f"dataset fgvc flowers: {data / 'OxfordFlower'} (MISSING)" in text
    assert f"weights mae_vitb16: {weights} (present)" in text
    assert "6 cell(s), 18 run(s), 54 epochs" in text and "iterations" not in text
    assert "estimated time at 0.5 s per reference image" in text and "estimate" in text
    assert not (tmp_path / "o").exists()


def test_dry_run_without_inputs_names_what_is_missing(capsys):
    assert main(["reproduce", "table1", "--dry-run", "--data-root", "/nonexistent", "--backbone", "mocov3_vitb16"]) == 0
    text = capsys.readouterr().out
    assert "dataset fgvc nabirds: /nonexistent/nabirds (MISSING)" in text
    assert "weights mocov3_vitb16: not given (--weights mocov3_vitb16=FILE; the file: vit-b-300ep.pth.tar" in text
    assert "published split sizes" in text and "add --time-per-image SECONDS" in text
    assert main(["reproduce", "table4", "--dry-run", "--time-per-image", "0"]) == 1
    assert "--time-per-image" in capsys.readouterr().err


def test_ade20k_iterations_are_never_added_to_epochs(capsys):
    assert main(["reproduce", "fig4", "--dry-run", "--json", "--weights", "mae_vitb16=a",
                 "--weights", "mocov3_vitb16=b"]) == 0
    info = json.loads(capsys.readouterr().out)
    seg = [s for s in info["specs"] if s["task"] == "ade20k"]
    cls = [s for s in info["specs"] if s["task"] != "ade20k"]
    assert len(seg) == 2 and len(cls) == 4
    assert all("epochs" not in s and s["iterations"] == 160000 for s in seg)
    assert info["iterations"] == 2 * 160000 and info["epochs"] == sum(s["runs"] * 100 for s in cls)
    for s in seg:  # 160000 x 16 crops; 10 single-scale evaluations (every 16000, the last at the end) + one
        w = s["work"]  # multi-scale + flip pass
        assert (w["train"], w["unit_train"], w["unit_eval"]) == (160000 * 16, "crops", "windows")
        # 2000 assumed 512x683 val images; 512-px windows at stride 341 of the image resized into 2048r x 512r:
        # r = 1: 512x683, 1 x 2 windows; r = 0.5 .. 1.75: 256x342 1, 384x512 1, 512x683 2, 640x854 2 x 3,
        # 768x1025 2 x 3, 896x1195 3 x 4; each again flipped
        assert w["eval"] == 10 * 2000 * 2 + 2000 * (1 + 1 + 2 + 6 + 6 + 12) * 2
    assert set(info["work"]) == {"train_images", "eval_images", "train_crops", "eval_windows"}
    assert main(["reproduce", "fig4", "--dry-run", "--weights", "mae_vitb16=a", "--weights", "mocov3_vitb16=b"]) == 0
    text = capsys.readouterr().out
    assert f"6 cell(s), 6 run(s), {info['epochs']} epochs and 320000 ADE20K iterations" in text


# -- the DIP figures --------------------------------------------------------------------------------
@pytest.fixture
def fgvc_images(tmp_path):
    root = tmp_path / "data"
    for folder, n in (("CUB_200_2011/images/001.Black_footed", 7), ("OxfordFlower/jpg", 6)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / folder / f"{i:03d}.jpg")
    return root


def test_dip_figures_are_registered_and_pick_their_images(fgvc_images):
    from gapt.analysis.reconstruct import plan_images
    from gapt.paper.plans import PLANS
    for name in ("fig2", "fig9", "fig10", "fig11"):
        plan = PLANS[name]()
        assert plan.name == name and plan.execute and plan.dry_run and plan.render
        assert plan.backbones == ["sup_vitb16", "mocov3_vitb16", "mae_vitb16"]  # the paper's rows
    names = {n: [f"{p.relative_to(fgvc_images).parts[0]}/{p.name}" for p in plan_images(n, fgvc_images)]
             for n in ("fig2", "fig10", "fig11")}
    assert names["fig2"] == ["CUB_200_2011/000.jpg", "CUB_200_2011/001.jpg", "OxfordFlower/000.jpg",
                             "OxfordFlower/001.jpg"]
    assert names["fig10"] == [f"CUB_200_2011/{i:03d}.jpg" for i in range(2, 6)]      # the 3rd to 6th, sorted
    assert names["fig11"] == [f"OxfordFlower/{i:03d}.jpg" for i in range(2, 6)]
    assert len(plan_images("fig9", fgvc_images)) == 7  # fewer than 100 CUB images: all of them


@pytest.mark.parametrize("name,images", [("fig2", 4), ("fig9", 7), ("fig10", 4), ("fig11", 4)])
def test_dip_figure_dry_run_lists_jobs(name, images, fgvc_images, tmp_path, capsys):
    from gapt.analysis.reconstruct import dip_job_flops
    npz = tmp_path / "imagenet21k_ViT-B_16.npz"
    npz.write_bytes(b"x")
    args = ["reproduce", name, "--dry-run", "--data-root", str(fgvc_images), "--weights", f"sup_vitb16={npz}",
            "--out", str(tmp_path / "o"), "--time-per-image", "0.01"]
    assert main(args + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["images"]) == images and info["images_from"] == "found under --data-root"
    assert [(j["backbone"], j["images"], j["blocks"], j["jobs"]) for j in info["jobs"]] == [
        (bb, images, 12, images * 12) for bb in ("sup_vitb16", "mocov3_vitb16", "mae_vitb16")]
    assert info["runs"] == 3 * images * 12 and info["dip_steps"] == info["runs"] * 2000
    assert info["flops"] == sum(images * dip_job_flops(bb, k) for bb in ("sup_vitb16", "mocov3_vitb16", "mae_vitb16")
                                for k in range(1, 13))
    assert [(w["backbone"], w["present"]) for w in info["weights"]] == [
        ("sup_vitb16", True), ("mocov3_vitb16", False), ("mae_vitb16", False)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"weights sup_vitb16: {npz} (present)" in text and "weights mae_vitb16: not given" in text
    assert f"{3 * images * 12} DIP job(s)" in text and "estimated time" in text
    assert main(args + ["--backbone", "mae_vitb16", "--json"]) == 1  # sup_vitb16's weights name another row
    capsys.readouterr()
    assert main(args[:5] + ["--backbone", "mae_vitb16", "--json"]) == 0
    assert [j["backbone"] for j in json.loads(capsys.readouterr().out)["jobs"]] == ["mae_vitb16"]
    assert not (tmp_path / "o").exists()


def test_a_method_the_formulas_do_not_cover_counts_images_but_no_flops(tmp_path):
    """Full fine-tuning (weight gradients everywhere) is not in the FLOP formulas: its images are counted, its
    FLOPs are not, and the totals say they are a lower bound."""
    from gapt.config import load_config
    from gapt.paper.plans import PRESETS, RunSpec
    from gapt.paper.workload import add_totals, format_dry_run, spec_work
    spec = RunSpec(name="mae_vitb16/full/cub", row="full", backbone="mae_vitb16", method="full", benchmark="fgvc",
                   task="cub", preset="fgvc/mae_vitb16/cub.yaml")
    cfg = load_config(str(PRESETS / spec.preset), ["method=full", "learn_temperature=false", "data.root=/x",
                                                   "train.epochs=2"])
    work = spec_work(spec, cfg, [], 1, tmp_path / "none")
    assert (work["train"], work["eval"]) == (5394 * 2, 600 * 2 + 5794 * 2) and work["flops"] is None
    assert "not counted for method full" in work["flops_note"]
    info = add_totals({"plan": "x", "out": "o", "specs": [{"name": spec.name, "runs": 1, "epochs": 2, "what": "",
                                                           "settings": "", "finals_done": 0, "work": work}],
                       "runs": 1, "epochs": 2, "iterations": 0})
    assert info["flops"] == 0 and info["flops_uncounted"] == [spec.name]
    assert "lower bound" in format_dry_run(info)
