"""`gapt analyze reconstruct` (SPEC §10): DIP on tiny ViTs at 32x32, scores from torchmetrics, resumable jobs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest  # noqa: F401 - registers the tiny backbones
from gapt.cli import main

TINY = dict(image_size=32, scales=2, channels=8, input_channels=8, save_every=5, log_every=1000)
MICRO = str(Path(__file__).resolve().parents[1] / "gapt" / "demo" / "assets" / "mae_vit_micro.safetensors")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread is many times faster than two fighting for a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    yy, xx = np.mgrid[0:40, 0:48]
    paths = []
    for i, name in enumerate(("cat/0.png", "dog/0.png")):
        img = np.stack([(xx * (3 + i)) % 255, (yy * 5) % 255, ((xx + yy) * (2 + i)) % 255], -1).astype(np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)
        paths.append(str(root / name))
    return paths


def hand_psnr(a, b):
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return 10 * np.log10(1.0 / mse)


def hand_ssim(a, b, k=11, sigma=1.5):
    """Wang et al. 2004 with a Gaussian window (by hand, numpy); as torchmetrics defines the borders: the images
    reflection-padded by k // 2, the SSIM map averaged over every pixel and channel."""
    from numpy.lib.stride_tricks import sliding_window_view
    g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(3):
        x, y = (np.pad(t[..., ch] / 255.0, k // 2, mode="reflect") for t in (a, b))
        f = lambda t: np.einsum("ijkl,kl->ij", sliding_window_view(t, (k, k)), w)  # noqa: E731 (valid region)
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        out.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(out))


def test_scores_are_psnr_and_gaussian_ssim():
    from gapt.analysis.dip import image_scores
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    s = image_scores(b, a)
    assert s["psnr"] == pytest.approx(hand_psnr(b, a), abs=1e-5)
    assert s["ssim"] == pytest.approx(hand_ssim(b, a), abs=1e-5)
    assert image_scores(a, a)["ssim"] == pytest.approx(1.0)


def test_generator_shape_and_range():
    from gapt.analysis.dip import SkipGenerator
    g = SkipGenerator(input_channels=8, channels=8, skip_channels=4, scales=3)
    with torch.no_grad():
        y = g(torch.rand(2, 8, 32, 32) * 0.1)
    assert y.shape == (2, 3, 32, 32) and 0 < float(y.min()) and float(y.max()) < 1


def _job(tmp_path, name, image, steps=30, **kw):
    from gapt.analysis.reconstruct import DEFAULTS, JOB_FILE
    folder = tmp_path / name
    folder.mkdir()
    spec = {**DEFAULTS, **TINY, "steps": steps, "image": image, "backbone": "test_mae_tiny", "weights": None,
            "backbone_seed": 0, "block": 2, "device": "cpu", **kw}
    (folder / JOB_FILE).write_text(json.dumps(spec))
    return folder


def test_dip_loss_falls_scores_match_library_and_job_resumes(tmp_path, pictures):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from gapt.analysis.dip import run_reconstruct_job
    full = run_reconstruct_job(_job(tmp_path, "full", pictures[0]))
    assert full["loss_last"] < 0.7 * full["loss_first"]
    folder = tmp_path / "full"
    rec = torch.from_numpy(np.array(Image.open(folder / "recon.png").convert("RGB"))).permute(2, 0, 1)[None] / 255.0
    org = torch.from_numpy(np.array(Image.open(folder / "original.png").convert("RGB"))).permute(2, 0, 1)[None] / 255.0
    assert rec.shape == org.shape == (1, 3, 32, 32)
    assert full["psnr"] == pytest.approx(float(peak_signal_noise_ratio(rec.double(), org.double(), data_range=1.0)), abs=1e-6)
    assert full["ssim"] == pytest.approx(float(structural_similarity_index_measure(
        rec.double(), org.double(), data_range=1.0, kernel_size=11, sigma=1.5)), abs=1e-6)
    assert json.loads((folder / "results.json").read_text())["psnr"] == full["psnr"]

    # killed after step 12 (state saved), then resumed: ends exactly where the uninterrupted job ended
    half = _job(tmp_path, "half", pictures[0])
    part = run_reconstruct_job(half, stop_after_step=12)
    assert part["step"] == 12 and not (half / "results.json").exists() and (half / "state.pt").exists()
    resumed = run_reconstruct_job(half, resume=True)
    assert resumed["loss_curve"] == pytest.approx(full["loss_curve"], rel=1e-5)
    assert resumed["psnr"] == pytest.approx(full["psnr"], abs=1e-4)


def test_reconstruct_command_grid_json_and_means(tmp_path, pictures, capsys):
    out = tmp_path / "rec"
    args = ["analyze", "reconstruct", *pictures, "--backbone", "test_mae_tiny", "--weights", "null",
            "--backbone", "test_moco_tiny", "--weights", "null", "--blocks", "1,3", "--steps", "3",
            "--image-size", "32", "--dip-scales", "2", "--dip-channels", "8", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "reconstruct.json").read_text())
    rows = summary["rows"]
    assert len(rows) == 2 * 2 * 2 and not summary["failed"]
    # the JSON holds the plotted numbers: each row is its job's results.json; means are over images
    for r in rows:
        job = json.loads((Path(r["folder"]) / "results.json").read_text())
        assert (r["psnr"], r["ssim"], r["block"], r["backbone"]) == (job["psnr"], job["ssim"], job["block"], job["backbone"])
        assert (Path(r["folder"]) / "recon.png").is_file()
    for m in summary["means"]:
        sel = [r for r in rows if r["label"] == m["label"] and r["block"] == m["block"]]
        assert m["n"] == 2 and m["psnr"] == pytest.approx(np.mean([r["psnr"] for r in sel]))
        assert m["ssim"] == pytest.approx(np.mean([r["ssim"] for r in sel]))
    assert (out / "reconstruct_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("grid_*.png"))) == 2  # cat/0.png and dog/0.png do not collide
    assert "mean PSNR" in (out / "reconstruct.md").read_text()
    # a second call finds every job done and trains nothing
    before = {r["folder"]: (Path(r["folder"]) / "results.json").stat().st_mtime_ns for r in rows}
    assert main(args) == 0
    assert all((Path(f) / "results.json").stat().st_mtime_ns == t for f, t in before.items())
    # other settings in the same folder are an error naming them
    capsys.readouterr()
    assert main([*args[:-2], "--steps", "4", "--out", str(out)]) == 1
    assert "steps" in capsys.readouterr().err


def test_reconstruct_jobs_in_worker_processes(tmp_path, pictures):
    """The process executor: one subprocess per job (the packaged micro MAE ViT, its shipped weights)."""
    from gapt.analysis.reconstruct import reconstruct
    from gapt.sweep.executors import ProcessExecutor
    res = reconstruct(pictures[:1], [{"backbone": "mae_vit_micro", "weights": MICRO}], blocks=[6],
                      out=tmp_path / "p", executor=ProcessExecutor(workers=1, use_gpus=False),
                      steps=2, device="cpu", **{k: v for k, v in TINY.items() if k != "image_size"}, image_size=32)
    assert not res["failed"] and [r["block"] for r in res["rows"]] == [6]
    assert "python -m gapt.sweep.executors" in (Path(res["rows"][0]["folder"]) / "train.log").read_text()
    assert all(np.isfinite(r["psnr"]) for r in res["rows"])
