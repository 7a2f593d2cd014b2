"""Regenerate the example figures of README's `gapt analyze` section (docs/figures/*.png) from real runs.

Every number drawn is measured here, on CPU, by the same code `gapt analyze` and `gapt reproduce` use:
the micro MAE ViT that ships in gapt/demo/assets (6 blocks, width 64, 32 px) trained on gapt's procedural
`shapes` tasks (count, shape) — not the paper's backbones, datasets or budgets, and every figure says so
in a caption above it. Runs: VPT-shallow, + GATE and + GATE + LT on both tasks (Figs. 4, 8); VPT-deep at
1, 2, 4 prompts per block and gated + LT at 12 and 24 prompts on count (Fig. 7, with the 6-prompt run of
Fig. 8); vpt@k for k = 1..6 on count (Fig. 1); two DIP reconstructions (Figs. 2, 9) and the attention of
the two Fig. 8 gated runs on count (Fig. 5). About 10 minutes on 2 cores; rerunnable (a fresh temporary
folder each time, same seeds, so the same numbers on the same machine):

    python scripts/make_readme_figures.py [--out docs/figures] [--workers 2]
"""
import argparse
import logging
import shutil
import tempfile
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "gapt" / "demo" / "assets" / "mae_vit_micro.safetensors"
# the budget of every classification run below (one seed, no lr search: the same lr for every method)
TRAIN_IMAGES, EPOCHS, LR, PROMPTS = 500, 6, 0.2, 6
RUN = (f"micro MAE ViT (gapt/demo/assets: 6 blocks, width 64, 32 px) on gapt's procedural shapes tasks; "
       f"{TRAIN_IMAGES} train images, {EPOCHS} epochs, SGD lr {LR}, one seed, no lr search")
CAPTION = "Example from real runs, not the paper's setting: "


def overrides(name: str, task: str, method: str, lt: bool = False, prompts: int = PROMPTS, **extra):
    out = ["backbone=mae_vit_micro", f"weights={MICRO}", "image_size=32", f"method={method}",
           f"learn_temperature={str(lt).lower()}", f"num_prompts={prompts}", "gate_init=5", "prompt_dropout=0",
           f"train.epochs={EPOCHS}", "train.warmup_epochs=1", "train.batch_size=32", f"train.lr={LR}",
           "train.seed=0", "data.format=shapes", f"data.name={task}", f"data.num_samples={TRAIN_IMAGES}",
           "data.num_workers=0", "device=cpu", "train.logger=none"]
    return name, out + [f"{k}={v}" for k, v in extra.items()]


def train_one(job):
    """One run in a worker process (one thread: the runs go side by side)."""
    name, over = job
    torch.set_num_threads(1)
    from gapt.config import load_config
    from gapt.engine.trainer import train
    cfg = load_config(None, over)
    if not (Path(cfg.out) / "results.json").exists():
        train(cfg)
    return name


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder, removed)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gapt-figs-"))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = tmp / "runs"

    # -- the classification runs (Figs. 4, 7, 8; Fig. 5 uses two of them) ------------------------
    steps = (("vpt-shallow", "vpt-shallow", False), ("gate", "gated", False), ("gate+lt", "gated", True))
    jobs = [overrides(f"ablation/{task}/{step}", task, method, lt) for task in ("count", "shape")
            for step, method, lt in steps]
    jobs += [overrides(f"tokens/deep{n}", "count", "vpt-deep", prompts=n) for n in (1, 2, 4)]
    jobs += [overrides(f"tokens/gate+lt{n}", "count", "gated", True, prompts=n) for n in (12, 24)]
    jobs = [(name, over + [f"out={runs / name}"]) for name, over in jobs]
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for name in pool.map(train_one, jobs):
            print("done:", name, flush=True)

    from gapt.analysis.ablation import analyze_ablation
    a = analyze_ablation([runs / "ablation"], tmp / "ablation-out")
    publish(a["png_tasks"], out / "ablation_tasks.png",
            CAPTION + RUN + f"; {PROMPTS} prompts, gate_init 5. Fig. 8's layout: a panel per task.")
    from gapt.analysis.gates import analyze_gates
    gated = [runs / "ablation" / task / "gate+lt" for task in ("count", "shape")]
    g = analyze_gates([str(r) for r in gated], tmp / "gates-out")
    publish(g["png_tasks"], out / "gates_tasks.png",
            CAPTION + RUN + f"; gated + LT, {PROMPTS} prompts, gate_init 5 (gates start at sigmoid(-5)).")
    from gapt.analysis.tokens import analyze_tokens
    k = analyze_tokens([runs / "tokens", runs / "ablation" / "count" / "gate+lt"], "count", tmp / "tokens-out")
    publish(k["png"], out / "tokens.png", CAPTION + RUN + "; VPT-deep at 1, 2, 4 prompts per block (x 6 blocks), "
            "gated + LT at 6, 12, 24 prompts. The paper's points are for MAE ViT-B/16 on Cars, so none are drawn.")

    # -- Fig. 1: vpt@k, k = 1..6, on count --------------------------------------------------------
    from gapt.analysis.insertion import insertion_sweep
    from gapt.config import load_config
    from gapt.sweep.executors import ProcessExecutor
    _, over = overrides("insertion", "count", "vpt-at-block")
    s = insertion_sweep(load_config(None, over + [f"out={runs / 'insertion'}"]),
                        executor=ProcessExecutor(workers=max(1, args.workers), use_gpus=False))
    publish(s["png"], out / "insertion.png", CAPTION + RUN + f"; {PROMPTS} prompts inserted at block k.")

    # -- Figs. 2 and 9: DIP from the micro ViT's blocks (and the same ViT with random weights) ------
    from gapt.analysis.reconstruct import reconstruct
    imgs = scenes(tmp / "pics")
    res = reconstruct(imgs, [{"backbone": "mae_vit_micro", "weights": str(MICRO), "label": "mae_vit_micro"},
                             {"backbone": "mae_vit_micro", "weights": None, "label": "random init"}],
                      blocks=[1, 3, 6], out=tmp / "rec", steps=200, image_size=32, scales=3, channels=16,
                      device="cpu")
    dip = ("micro MAE ViT (gapt/demo/assets) and the same ViT with random weights, two 32 px procedural "
           "images, DIP with 3 scales x 16 channels for 200 steps (SPEC §10: 5 x 128, 2000 steps, 224 px)")
    publish(res["png"]["metrics"], out / "reconstruct_metrics.png", CAPTION + dip + ".")
    publish(res["png"][res["rows"][0]["image"]], out / "reconstruct_grid.png", CAPTION + dip + ".")

    # -- Fig. 5: attention of the two gated runs on count, frozen backbone first -------------------
    from gapt.analysis.attention import analyze_attention
    att = analyze_attention([str(runs / "ablation" / "count" / n) for n in ("gate", "gate+lt")], imgs[0],
                            out=tmp / "att")
    publish(att["png"], out / "attention.png", CAPTION + RUN + "; the count task's + GATE and + GATE + LT runs.")

    for stale in ("ablation.png",):  # Fig. 6 needs benchmark means (FGVC, VTAB-1k, ADE20K): no example here
        (out / stale).unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(out.glob("*.png")):
        print(f, f.stat().st_size // 1024, "KB")


def scenes(folder: Path):
    """Two 32x32 procedural pictures (a disc and a bar on a plain ground)."""
    yy, xx = np.mgrid[0:32, 0:32]
    paths = []
    for i in range(2):
        img = np.zeros((32, 32, 3), np.uint8)
        img[...] = (40 + 30 * i, 60, 90)
        img[(xx - 10 - 8 * i) ** 2 + (yy - 12) ** 2 < 40] = (230, 200, 40)
        img[20:28, 14:30] = (200, 40, 60 + 80 * i)
        path = folder / f"scene{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def publish(src, dst: Path, caption: str, width: int = 900) -> Path:
    """``src`` with ``caption`` set above it, at most ``width`` pixels wide, as a 128-colour PNG (< 100 KB)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    im = Image.open(src).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    lines = textwrap.wrap(caption, width=max(40, int(im.width / 7.2)))
    band = 18 * len(lines) + 12
    dpi = 100
    fig = plt.figure(figsize=(im.width / dpi, (im.height + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, im.height / (im.height + band)))
    ax.imshow(np.asarray(im))
    ax.axis("off")
    fig.text(0.01, 1 - 6 / (im.height + band), "\n".join(lines), va="top", ha="left", fontsize=9.5,
             color="#7a1f1f", linespacing=1.35)
    dst = Path(dst)
    fig.savefig(dst, dpi=dpi)
    plt.close(fig)
    Image.open(dst).convert("RGB").quantize(128).save(dst, optimize=True)
    return dst


if __name__ == "__main__":
    main()
