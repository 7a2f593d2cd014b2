"""Regenerate the small example figures of README's `gapt analyze` section (docs/figures/*.png).

Reconstruction and attention come from real (tiny) runs of the packaged micro MAE ViT on
procedural images; insertion, gates, ablation and tokens are drawn by the same code from
synthetic numbers (fixture run folders written here). CPU, a few minutes:

    python scripts/make_readme_figures.py [--out docs/figures]
"""
import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "gapt" / "demo" / "assets" / "mae_vit_micro.safetensors"


def write_result(folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"num_prompts": 100, "prompt_init": "random", "seed": 42, "final": True, "learn_temperature": False,
            "insert_at_block": 1}
    (folder / "results.json").write_text(json.dumps({**base, **kw}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--only-synthetic", action="store_true", help="skip the (slow) reconstruction and attention runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gapt-figs-"))
    torch.set_num_threads(1)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = np.random.default_rng(0)

    # Fig. 1 (synthetic curves drawn by plot_insertion)
    from gapt.analysis.insertion import plot_insertion
    curves = []
    for bb, lr, jump, base in (("mae_vitb16", 0.1, 11, 35.0), ("mocov3_vitb16", 1.0, 8, 70.0), ("sup_vitb16", 0.1, 13, 85.0)):
        rows = [{"block": k, "test_top1": base + (8.0 if k >= jump else 0.0) - 1.5 * max(0, k - jump)
                 + rng.normal(0, 0.6), "val_top1": None}
                for k in range(1, 13)]
        curves.append({"backbone": bb, "lr": lr, "runs": rows})
    plot_insertion(curves, out / "insertion.png", title="example (synthetic numbers): CUB, prompts inserted at block k")

    if not args.only_synthetic:
        real_runs(out, tmp)
    synthetic(out, tmp, rng)
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(out.glob("*.png")):
        if f.name == "demo.png":   # a copy of `gapt demo`'s own figure (README's demo section), not made here
            continue
        shrink(f)
        print(f, f.stat().st_size // 1024, "KB")


def real_runs(out: Path, tmp: Path) -> None:
    # Figs. 2 and 9: a real DIP run on the micro ViT (32x32), 2 procedural images, every block
    from gapt.analysis.reconstruct import reconstruct
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = []
    for i in range(2):
        img = np.zeros((32, 32, 3), np.uint8)
        img[...] = (40 + 30 * i, 60, 90)
        img[(xx - 10 - 8 * i) ** 2 + (yy - 12) ** 2 < 40] = (230, 200, 40)
        img[20:28, 14:30] = (200, 40, 60 + 80 * i)
        path = tmp / "pics" / f"scene{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        imgs.append(str(path))
    res = reconstruct(imgs, [{"backbone": "mae_vit_micro", "weights": str(MICRO), "label": "mae_vit_micro"},
                             {"backbone": "mae_vit_micro", "weights": None, "label": "random init"}],
                      blocks=[1, 3, 6], out=tmp / "rec", steps=200, image_size=32, scales=3, channels=16,
                      device="cpu")
    shutil.copy(res["png"]["metrics"], out / "reconstruct_metrics.png")
    shutil.copy(res["png"][res["rows"][0]["image"]], out / "reconstruct_grid.png")

    # Fig. 5: two tiny real runs (GATE, GATE + LT) on the micro ViT, shapes data
    from gapt.config import load_config
    from gapt.engine.trainer import train
    runs = []
    for name, lt in (("gate", "false"), ("gate+lt", "true")):
        cfg = load_config(None, ["backbone=mae_vit_micro", f"weights={MICRO}", "image_size=32", "num_prompts=4",
                                 "method=gated", f"learn_temperature={lt}", "train.epochs=3", "train.warmup_epochs=0",
                                 "train.batch_size=64", "train.lr=1.0", "data.num_workers=0", "device=cpu",
                                 "data.format=shapes", "data.name=count", "data.num_samples=256",
                                 f"out={tmp / 'runs' / name}"])
        train(cfg)
        runs.append(str(tmp / "runs" / name))
    from gapt.analysis.attention import analyze_attention
    att = analyze_attention(runs, imgs[0], out=tmp / "att")
    shutil.copy(att["png"], out / "attention.png")



def synthetic(out: Path, tmp: Path, rng) -> None:
    # Fig. 4: gates of hand-set logits on the micro ViT (synthetic)
    from gapt import build_model
    from gapt.analysis.gates import analyze_gates
    gate_runs = []
    for name, task, bb, logits in (("mae-nabirds", "nabirds", "mae_vitb16", [-6, -5, -4, -1, 3]),
                                   ("mae-cars", "cars", "mae_vitb16", [-5, -5, -3, 0, 2]),
                                   ("moco-cars", "cars", "mocov3_vitb16", [-1, 0, 1, -2, -3]),
                                   ("mae-ade20k", "ade20k", "mae_vitb16", [-2, -1, 1, 0, 1])):
        model = build_model("mae_vit_micro", method="gated", num_prompts=2, num_classes=3, weights=str(MICRO))
        with torch.no_grad():
            model.gate_logits.copy_(torch.tensor(logits, dtype=torch.float32))
        folder = tmp / "gates" / name
        folder.mkdir(parents=True)
        model.save_tuned(str(folder / "tuned.safetensors"))
        (folder / "results.json").write_text(json.dumps({"task": task, "backbone": bb}))
        gate_runs.append(str(folder))
    g = analyze_gates(gate_runs, tmp / "gates-out")
    shutil.copy(g["png_tasks"], out / "gates_tasks.png")

    # Figs. 6, 8: synthetic results in the trainer's layout
    from gapt.analysis.ablation import analyze_ablation
    steps = (("vpt-shallow", "vpt-shallow", False), ("gated", "gated", False), ("gated+temperature", "gated", True))
    fgvc = ("cub", "flowers", "cars", "dogs", "nabirds")
    vtab = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "patch_camelyon",
            "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti",
            "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")
    for bb, base in (("mae_vitb16", 45.0), ("mocov3_vitb16", 70.0)):
        for s, (key, method, lt) in enumerate(steps):
            for t in fgvc:
                write_result(tmp / "abl" / bb / key / t, backbone=bb, method=method, learn_temperature=lt,
                             benchmark="fgvc", task=t, metrics={"test_top1": base + 8 * s + rng.normal(0, 3) + 10})
            for t in vtab:
                write_result(tmp / "abl" / bb / key / t, backbone=bb, method=method, learn_temperature=lt,
                             benchmark="vtab", task=t, metrics={"test_top1": base - 5 + 4 * s + rng.normal(0, 5)})
            write_result(tmp / "abl" / bb / key / "ade20k", backbone=bb, method=method, learn_temperature=lt,
                         benchmark="ade20k", task="ade20k", metrics={"mIoU": 34 + 1.5 * s, "mIoU_ms": 35 + 1.5 * s})
    a = analyze_ablation([tmp / "abl"], tmp / "abl-out")
    shutil.copy(a["png"], out / "ablation.png")
    shutil.copy(a["png_tasks"], out / "ablation_tasks.png")

    # Fig. 7: synthetic runs
    from gapt.analysis.tokens import analyze_tokens
    for per_block in (1, 2, 4, 8):
        write_result(tmp / "tok" / f"deep{per_block}", backbone="mae_vitb16", method="vpt-deep", benchmark="fgvc",
                     task="cars", num_prompts=per_block, metrics={"test_top1": 50 + 5 * math.log2(per_block * 2)})
    for total in (12, 24, 48, 96):
        write_result(tmp / "tok" / f"gated{total}", backbone="mae_vitb16", method="gated", learn_temperature=True,
                     benchmark="fgvc", task="cars", num_prompts=total,
                     metrics={"test_top1": 60 + 3 * math.log2(total / 12)})
    k = analyze_tokens([tmp / "tok"], "cars", tmp / "tok-out")
    shutil.copy(k["png"], out / "tokens.png")


def shrink(path: Path, width: int = 900) -> None:
    """README copies stay small (< 100 KB): at most ``width`` pixels wide, a 128-colour palette."""
    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.quantize(128).save(path, optimize=True)


if __name__ == "__main__":
    main()
