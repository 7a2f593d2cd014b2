"""`gapt analyze reconstruct` (SPEC §10): DIP on tiny ViTs at 32x32, scores from torchmetrics, resumable jobs."""
import json
import warnings
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


# -- DIP's skip network, transcribed from the authors' code (models/skip.py `skip()`, models/common.py
# `conv`, `bn`, `act`, `Concat`) with the arguments of its denoising notebook's `get_net(..., 'skip', pad,
# skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5, upsample_mode='bilinear')`: every scale has
# `channels` down / up channels and `skip` skip channels, 3x3 down and up filters, 1x1 skip filters,
# reflection padding, stride-2 downsampling, LeakyReLU(0.2), the 1x1 up convolution, a sigmoid.
class DipConcat(torch.nn.Module):
    """common.py Concat(1, skip, deeper): both branches on the input, centre-cropped to the smaller size."""

    def __init__(self, *branches):
        super().__init__()
        for i, b in enumerate(branches):
            self.add_module(str(i), b)

    def forward(self, x):
        outs = [m(x) for m in self.children()]
        h, w = min(o.shape[2] for o in outs), min(o.shape[3] for o in outs)
        outs = [o[:, :, (o.shape[2] - h) // 2:(o.shape[2] - h) // 2 + h, (o.shape[3] - w) // 2:(o.shape[3] - w) // 2 + w]
                for o in outs]
        return torch.cat(outs, 1)


def dip_skip(input_channels, channels, skip, scales):
    nn = torch.nn

    def conv(cin, cout, k, stride=1):  # common.py conv(pad='reflection', downsample_mode='stride', bias=True)
        return [nn.ReflectionPad2d((k - 1) // 2), nn.Conv2d(cin, cout, k, stride, padding=0, bias=True)]

    def bn_act(c):
        return [nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]

    model = nn.Sequential()
    level, depth = model, input_channels
    for i in range(scales):
        deeper, skip_branch, deeper_main = nn.Sequential(), nn.Sequential(), nn.Sequential()
        level.append(DipConcat(skip_branch, deeper))
        level.append(nn.BatchNorm2d(skip + channels))  # skip + (up channels of scale i+1, or down of the last)
        skip_branch.extend(conv(depth, skip, 1) + bn_act(skip))
        deeper.extend(conv(depth, channels, 3, 2) + bn_act(channels) + conv(channels, channels, 3) + bn_act(channels))
        if i < scales - 1:
            deeper.append(deeper_main)
        deeper.append(nn.Upsample(scale_factor=2, mode="bilinear"))
        level.extend(conv(skip + channels, channels, 3) + bn_act(channels) + conv(channels, channels, 1)
                     + bn_act(channels))
        level, depth = deeper_main, channels
    model.extend(conv(channels, 3, 1) + [nn.Sigmoid()])
    return model


def copy_state(dst, src):
    """src's parameters and buffers (a module or a state dict) into dst, by position (both register them in the
    same order); shapes must agree one for one, which they do only if the layers, their channels and their
    order agree."""
    a, b = list(dst.state_dict().items()), list((src if isinstance(src, dict) else src.state_dict()).values())
    assert len(a) == len(b), (len(a), len(b))
    for (name, t), v in zip(a, b):
        assert t.shape == v.shape, (name, t.shape, v.shape)
    dst.load_state_dict({name: v.clone() for (name, _), v in zip(a, b)})
    return dst


def test_generator_is_dips_skip_network():
    """SPEC §10's generator against the authors' architecture (transcribed above): same layers, channels, skips,
    upsampling and order (the weights copy one for one), the same output in training and evaluation mode,
    and SPEC's numbers: 5 scales, 128 channels, 4-channel skips, 32 input channels, bilinear x2."""
    from gapt.analysis.dip import DEFAULTS, SkipGenerator
    nn = torch.nn
    default = SkipGenerator()
    convs = [m for m in default.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 * 5 + 1  # per scale: skip 1x1, down 3x3 s2, 3x3, up 3x3, 1x1; then the 1x1 head
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs[:5]] == [
        (32, 4, 1, 1), (32, 128, 3, 2), (128, 128, 3, 1), (128, 4, 1, 1), (128, 128, 3, 2)]  # scale 1; scale 2 begins
    assert (convs[-1].in_channels, convs[-1].out_channels, convs[-1].kernel_size[0]) == (128, 3, 1)
    ups = [m for m in default.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 5 and all(u.mode == "bilinear" and u.scale_factor == 2 for u in ups)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default.modules()) == 5 * 6
    assert {m.negative_slope for m in default.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    assert (DEFAULTS["scales"], DEFAULTS["channels"], DEFAULTS["skip_channels"], DEFAULTS["input_channels"]) == \
        (5, 128, 4, 32)
    copy_state(dip_skip(32, 128, 4, 5), default)  # the full SPEC size copies one for one

    torch.manual_seed(0)
    g = SkipGenerator(input_channels=8, channels=8, skip_channels=4, scales=5)
    reference = copy_state(dip_skip(8, 8, 4, 5), g)
    z = torch.rand(2, 8, 64, 64) * 0.1
    for train in (True, False):
        g.train(train)
        reference.train(train)
        with torch.no_grad():
            y, want = g(z), reference(z)
        assert y.shape == (2, 3, 64, 64) and 0 < float(y.min()) and float(y.max()) < 1
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)


def block_tokens_by_hook(vit, images, block):
    """The tokens leaving block ``block`` (1-based), caught by a forward hook in timm's own forward."""
    caught = []
    handle = vit.blocks[block - 1].register_forward_hook(lambda m, i, o: caught.append(o))
    try:
        vit.forward_features(images)
    finally:
        handle.remove()
    return caught[0]


def _job(tmp_path, name, image, steps=30, **kw):
    from gapt.analysis.reconstruct import DEFAULTS, JOB_FILE
    folder = tmp_path / name
    folder.mkdir()
    spec = {**DEFAULTS, **TINY, "steps": steps, "image": image, "backbone": "test_mae_tiny", "weights": None,
            "backbone_seed": 0, "block": 2, "device": "cpu", **kw}
    (folder / JOB_FILE).write_text(json.dumps(spec))
    return folder


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_dip_first_step_target_loss_and_adam_by_hand(tmp_path, pictures):
    """SPEC §10, step 1 of a job redone by hand: x0 = the image resized on its short side (bicubic) and
    centre-cropped; target = the tokens leaving block l of timm's own forward on the ImageNet-normalised x0
    (a forward hook); z ~ U[0, 0.1), then noise of std 1/30, from the job's seeded generator; the output of
    DIP's skip network (transcribed, the job's initial weights copied in, training mode); loss = mean squared
    error of the block-l tokens; Adam's first step at lr 0.01 (bias-corrected m / sqrt(v) = g / |g|)."""
    from gapt.analysis.dip import SkipGenerator, run_reconstruct_job
    from gapt.model.build import build_backbone
    folder = _job(tmp_path, "one", pictures[0], steps=1, block=3)
    run_reconstruct_job(folder)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)

    im = Image.open(pictures[0]).convert("RGB")  # 48 x 40 -> short side 32 (bicubic), centre crop 32 x 32
    w, h = im.size
    im = im.resize((round(w * 32 / h), 32), Image.BICUBIC)
    left = (im.size[0] - 32) // 2
    x0 = np.asarray(im.crop((left, 0, left + 32, 32)))
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "original.png")), x0)
    x0 = torch.from_numpy(x0.copy()).permute(2, 0, 1)[None].float() / 255.0

    def normalise(x):
        return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a random backbone, on purpose
        vit, _ = build_backbone("test_mae_tiny", None, image_size=32, random_seed=0)  # the job's backbone
    vit.eval().requires_grad_(False)
    with torch.no_grad():
        target = block_tokens_by_hook(vit, normalise(x0), 3)
    assert target.shape == (1, 1 + 16, 32)  # CLS + 4 x 4 patches, no prompts

    torch.manual_seed(0)  # the job's seed: its generator's initial weights
    initial = SkipGenerator(TINY["input_channels"], TINY["channels"], 4, TINY["scales"])
    net = copy_state(dip_skip(TINY["input_channels"], TINY["channels"], 4, TINY["scales"]), initial)
    before = {k: v.clone() for k, v in net.named_parameters()}
    rng = torch.Generator().manual_seed(0)
    z = torch.rand(1, TINY["input_channels"], 32, 32, generator=rng) * 0.1
    torch.testing.assert_close(state["z"], z, atol=0, rtol=0)
    noise = torch.randn(z.shape, generator=rng) / 30
    net.train()
    loss = ((block_tokens_by_hook(vit, normalise(net(z + noise)), 3) - target) ** 2).mean()
    loss.backward()
    assert state["losses"] == [pytest.approx(loss.item(), rel=1e-5)]
    after = list(state["net"].values())
    scale = max(float(p.grad.abs().max()) for p in net.parameters())
    checked = total = 0
    for (name, p0), got in zip(net.named_parameters(), [after[i] for i, k in enumerate(net.state_dict())
                                                        if k in before]):
        expected = p0.detach() - 0.01 * p0.grad / (p0.grad.abs() + 1e-8)
        # a gradient at float-noise level (a bias right before a BatchNorm: zero in exact arithmetic) has no
        # reliable sign; there only |step| <= lr is checked
        sure = p0.grad.abs() > 1e-4 * scale
        torch.testing.assert_close(got[sure], expected[sure], atol=1e-6, rtol=1e-5, msg=name)
        assert float((got - p0.detach()).abs().max()) <= 0.01 + 1e-6, name
        checked, total = checked + int(sure.sum()), total + sure.numel()
    assert checked > 0.9 * total
    opt = state["opt"]["param_groups"][0]
    assert (opt["lr"], tuple(opt["betas"]), opt["eps"], opt["weight_decay"]) == (0.01, (0.9, 0.999), 1e-8, 0)


def test_dip_loss_falls_scores_match_library_and_job_resumes(tmp_path, pictures):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from gapt.analysis.dip import run_reconstruct_job
    full = run_reconstruct_job(_job(tmp_path, "full", pictures[0]))
    assert full["loss_last"] < 0.7 * full["loss_first"]
    folder = tmp_path / "full"
    # the scored image is drawn as DIP draws it: the generator in training mode (BatchNorm on the image's own
    # statistics), fed the fixed z; the final state (saved before that forward) in the transcribed network
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    net = copy_state(dip_skip(TINY["input_channels"], TINY["channels"], 4, TINY["scales"]), state["net"])
    saved = np.asarray(Image.open(folder / "recon.png").convert("RGB")).astype(int)

    def drawn(train):
        net.train(train)
        with torch.no_grad():
            return (net(state["z"])[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).astype(int)
    assert np.abs(drawn(True) - saved).max() <= 1 and full["render"] == "train"
    assert np.abs(drawn(False) - saved).max() > 1  # evaluation mode (running averages) draws another image
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


def test_a_job_drawn_in_evaluation_mode_is_not_mixed_in(tmp_path, pictures):
    """Job folders made before the scored image was drawn in training mode (no "render" in job.json) are an
    error naming the setting, not reused beside the new ones."""
    from gapt.analysis.reconstruct import JOB_FILE, reconstruct_jobs
    opts = {**TINY, "steps": 3, "device": "cpu", "backbone_seed": 0}
    backbones = [{"backbone": "test_mae_tiny", "weights": None}]
    (job,) = reconstruct_jobs(pictures[:1], backbones, [2], tmp_path, **opts)
    job.folder.mkdir(parents=True)
    old = {k: v for k, v in job.spec.items() if k != "render"}
    (job.folder / JOB_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match="render"):
        reconstruct_jobs(pictures[:1], backbones, [2], tmp_path, **opts)
