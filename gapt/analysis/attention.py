"""``gapt analyze attention``: per-block attention maps of tuned runs beside their frozen backbone (Fig. 5).

For each image: one figure with a row per model -- the frozen backbone first (no prompts, no
temperatures), then each run's CLS attention (and, for a single prompt run, the mean attention of
its prompt rows) -- and a column per chosen block. Beside the PNG: the raw maps (``.npz``), the
numbers of every row and block (``.json``: CLS mass on patches / prompts / prefix) and the same as
a Markdown table. Output names carry the image's folder, stem, a short hash of its full path and
the head, so ``cat/0.jpg`` and ``dog/0.jpg``, or two ``--head`` values, never overwrite each other.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .plotting import new_figure, run_labels, save_png, write_text

PathLike = Union[str, Path]

# Parts that change the backbone's own tensors in place: the pretrained ones must be loaded again.
_IN_PLACE = {"full", "bitfit", "davpt-bias"}


def _frozen_counterpart(cfg, model):
    """The backbone without any trained part. Prompt methods share the tuned model's own (frozen)
    backbone module, so the weights are identical by construction and nothing is loaded twice;
    LoRA / SSF wrappers are stripped from a copy (their frozen layers stay); full fine-tuning,
    BitFit and DA-VPT+'s biases changed the backbone, so the pretrained one is built from cfg.weights."""
    import copy

    from ..model import PromptedViT, build_model
    from ..model.parts import Wrapper, strip
    if _IN_PLACE & set(str(model.method).split("+")):
        with warnings.catch_warnings():
            if cfg.weights is None:
                warnings.simplefilter("ignore")
            return build_model(cfg.backbone, method="linear", weights=cfg.weights, image_size=cfg.image_size,
                               num_classes=model.num_classes, random_seed=cfg.train.seed).eval()
    backbone = model.backbone
    if any(isinstance(m, Wrapper) for m in backbone.modules()):
        backbone = strip(copy.deepcopy(backbone))
    return PromptedViT(backbone, method="linear", num_classes=model.num_classes, pooling=model.pooling,
                       backbone_name=model.backbone_name, image_size=model.image_size).eval()

def _load_run_for_analysis(run_dir: PathLike):
    """``load_run`` (a ``weights: null`` run gets the random backbone it trained on, rebuilt from
    train.seed by the engine), with the random-weights warning kept quiet."""
    from ..engine.inference import load_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_run(str(run_dir))

def _reduce_heads(probs: torch.Tensor, head: Union[str, int]) -> torch.Tensor:
    """(heads, S, S) -> (S, S)."""
    if head == "mean":
        return probs.mean(0)
    return probs[int(head)]

@torch.no_grad()
def attention_summary(model, image: torch.Tensor, head: Union[str, int] = "mean") -> Dict[str, np.ndarray]:
    """Per block the attention of one image (3, H, W) from CLS and from the prompts to the patches.

    Arrays (L = blocks, N = patches, P = heads):
      cls (L, N)            CLS row over the patch tokens (head-reduced)
      cls_heads (L, P, N)   the same per head
      cls_to_prefix (L,)    CLS row mass on CLS (and registers)
      cls_to_prompts (L,)   CLS row mass on the prompt tokens (0 in a block without prompts)
      prompts (L, N)        mean over the prompt rows of their attention to the patches (NaN rows
                            where a block has no prompts)
      prompts_heads (L, P, N)
      num_prompts (L,)      prompts present in each block's sequence
    so that ``cls.sum(1) + cls_to_prefix + cls_to_prompts == 1`` for every block.
    """
    pre = model.backbone.num_prefix_tokens
    gh, gw = image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size
    n = gh * gw
    maps = model.attention_maps(image[None])
    heads = maps[0].shape[1]
    if head != "mean" and not 0 <= int(head) < heads:
        raise ValueError(f"--head {head} is out of range: the backbone has heads 0..{heads - 1} (or 'mean')")
    out: Dict[str, list] = {k: [] for k in ("cls", "cls_heads", "cls_to_prefix", "cls_to_prompts", "prompts",
                                           "prompts_heads", "num_prompts")}
    for probs in maps:
        probs = probs[0].float().cpu()                      # (heads, S, S)
        n_p = probs.shape[-1] - pre - n
        if n_p < 0:
            raise ValueError(f"attention over {probs.shape[-1]} tokens cannot hold {pre} prefix tokens and {n} "
                             f"patches; is the image {model.image_size}x{model.image_size}?")
        cls_row = probs[:, 0]                                # (heads, S)
        out["cls_heads"].append(cls_row[:, pre + n_p:])
        reduced = _reduce_heads(probs, head)
        out["cls"].append(reduced[0, pre + n_p:])
        out["cls_to_prefix"].append(float(reduced[0, :pre].sum()))
        out["cls_to_prompts"].append(float(reduced[0, pre:pre + n_p].sum()))
        if n_p:
            rows = probs[:, pre:pre + n_p, pre + n_p:].mean(1)  # (heads, N)
            out["prompts_heads"].append(rows)
            out["prompts"].append(_reduce_heads(probs[:, pre:pre + n_p, pre + n_p:], head).mean(0))
        else:
            out["prompts_heads"].append(torch.full((heads, n), float("nan")))
            out["prompts"].append(torch.full((n,), float("nan")))
        out["num_prompts"].append(n_p)
    arrays = {k: (torch.stack(v).numpy() if isinstance(v[0], torch.Tensor) else np.asarray(v))
              for k, v in out.items()}
    arrays["grid"] = np.asarray([gh, gw])
    return arrays

def _overlay(ax, picture: np.ndarray, amap: Optional[np.ndarray], grid: Tuple[int, int]) -> None:
    ax.imshow(picture)
    if amap is not None and np.isfinite(amap).all():
        m = torch.from_numpy(amap.reshape(grid).astype(np.float32))[None, None]
        up = F.interpolate(m, size=picture.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
        lo, hi = float(up.min()), float(up.max())
        ax.imshow((up - lo) / (hi - lo) if hi > lo else np.zeros_like(up), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    else:
        ax.text(0.5, 0.5, "no prompts\nin this block", ha="center", va="center", transform=ax.transAxes,
                fontsize=7, color="white", bbox=dict(facecolor="black", alpha=0.6))
    ax.set_xticks([])
    ax.set_yticks([])

def plot_attention(rows: List[Tuple[str, np.ndarray]], picture: np.ndarray, grid: Tuple[int, int],
                   out_png: PathLike, title: str = "", blocks: Optional[Sequence[int]] = None) -> Path:
    """A grid: one row per (name, (L, N) maps), one column per block (1-based ``blocks``, default all);
    each map min-max scaled on its own, upsampled bilinearly over ``picture`` (H, W, 3 in [0, 1])."""
    blocks = list(blocks) if blocks else list(range(1, rows[0][1].shape[0] + 1))
    fig = new_figure(1.45 * len(blocks) + 1.2, 1.55 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(blocks), squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for c, b in enumerate(blocks):
            ax = axes[r, c]
            _overlay(ax, picture, maps[b - 1], grid)
            if r == 0:
                ax.set_title(f"block {b}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, out_png)

def _display_picture(x: torch.Tensor, mean=None, std=None) -> np.ndarray:
    from ..data import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(mean or IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

def output_name(image: PathLike, head: Union[str, int]) -> str:
    """``attention_<folder>-<stem>_head-<head>_<hash>``: unique per image path and head, readable."""
    p = Path(image)
    digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:6]
    folder = p.resolve().parent.name or "root"
    return f"attention_{folder}-{p.stem}_head-{head}_{digest}"

def is_run_folder(path: PathLike) -> bool:
    from ..engine import runfolder as rf
    p = Path(path)
    return p.is_dir() and ((p / rf.CONFIG).is_file() or (p / rf.TUNED).is_file())

def split_runs_and_images(paths: Sequence[PathLike]) -> Tuple[List[str], List[Path]]:
    """``RUN... IMAGE...``: the leading run folders, then images or folders of images (expanded as
    ``gapt predict`` does). A folder that is neither a run nor holds images is an error naming it."""
    from ..engine.inference import expand_images
    paths = [str(p) for p in paths]
    runs = []
    while paths and is_run_folder(paths[0]):
        runs.append(paths.pop(0))
    if not runs:
        raise ValueError(f"{paths[0] if paths else '(nothing)'} is not a run folder (no config.yaml or "
                         f"tuned.safetensors); give RUN... then IMAGE")
    if not paths:
        raise ValueError("no image given: `gapt analyze attention RUN... IMAGE` (an image file or a folder of images)")
    for p in paths:
        if is_run_folder(p):
            raise ValueError(f"{p} is a run folder after an image; give all run folders first, then the images")
    return runs, expand_images(paths)

def analyze_attention(run_dir: Union[PathLike, Sequence[PathLike]], image: PathLike, out: Optional[PathLike] = None,
                      head: Union[str, int] = "mean", device: Optional[str] = None,
                      blocks: Optional[Sequence[int]] = None, models=None) -> Dict[str, Any]:
    """Attention maps of one or more tuned runs beside their frozen backbone(s) for one image.

    Rows: frozen backbone (one per distinct backbone + weights), then each run's CLS map; with a
    single prompt run also its prompts' mean map. Writes ``<name>.png``, ``<name>.npz`` (arrays
    ``frozen_<k>`` / ``frozen<j>_<k>`` and ``run<i>_<k>`` for the keys of :func:`attention_summary`,
    plus ``grid``, ``head``, ``image``, ``labels``), ``<name>.json`` and ``<name>.md`` into ``out``
    (default ``<first run>/analysis``), ``<name>`` from :func:`output_name`. ``models``: already
    loaded ``(cfg, model, results)`` per run (several images reuse them). Returns arrays and paths.
    """
    from PIL import Image

    from ..data import eval_transform
    from ..engine.run import resolve_device

    runs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    head = head if head == "mean" else int(head)
    img = Path(image)
    if img.is_dir():
        raise IsADirectoryError(f"{image} is a directory; give an image file (the CLI expands folders)")
    if not img.is_file():
        raise FileNotFoundError(f"image not found: {image}")
    loaded = models or [_load_run_for_analysis(r) for r in runs]
    cfg0, model0, results0 = loaded[0]
    info = results0.get("data") or {"format": cfg0.data.format, "name": cfg0.data.name}
    try:
        pil = Image.open(img).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {image}: {e}") from None
    depth = len(model0.backbone.blocks)
    blocks = list(blocks) if blocks else list(range(1, depth + 1))
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"--blocks {bad}: the backbone {cfg0.backbone} has blocks 1..{depth}")
    dev = torch.device(device) if device else resolve_device(cfg0)

    labels = run_labels(runs)
    frozen_rows, run_rows, arrays = [], [], {}
    frozen_of: Dict[Tuple[str, Optional[str]], int] = {}
    x0 = None
    for i, ((cfg, model, results), label) in enumerate(zip(loaded, labels)):
        if len(model.backbone.blocks) != depth:
            raise ValueError(f"run {runs[i]} has {len(model.backbone.blocks)} blocks but {runs[0]} has {depth}; "
                             f"one figure needs backbones of one depth")
        x = eval_transform(results.get("data") or info, cfg.image_size)(pil)
        x0 = x if x0 is None else x0
        model.to(dev)
        key = (cfg.backbone, cfg.weights)
        if key not in frozen_of:
            j = len(frozen_of)
            frozen_of[key] = j
            fmaps = attention_summary(_frozen_counterpart(cfg, model).to(dev), x.to(dev), head)
            prefix = "frozen" if j == 0 else f"frozen{j}"
            arrays.update({f"{prefix}_{k}": v for k, v in fmaps.items()
                           if k in ("cls", "cls_heads", "cls_to_prefix")})  # no prompts there
            frozen_rows.append((f"frozen {cfg.backbone}: CLS", fmaps, prefix))
        maps = attention_summary(model, x.to(dev), head)
        arrays.update({f"run{i}_{k}": v for k, v in maps.items() if k != "grid"})
        grid = tuple(int(v) for v in maps["grid"])
        name = f"{label} ({model.method}{'+LT' if model.learn_temperature else ''})"
        run_rows.append((f"{name}: CLS", maps, f"run{i}"))
        if len(runs) == 1 and model.num_prompts:
            run_rows.append((f"{name}: prompts (mean)", maps, f"run{i}-prompts"))

    out_dir = Path(out) if out else Path(runs[0]) / "analysis"
    stem = output_name(img, head)
    rows = [(n, m["prompts"] if tag.endswith("-prompts") else m["cls"]) for n, m, tag in frozen_rows + run_rows]
    title = f"{img.name}, head {head}"
    png = plot_attention(rows, _display_picture(x0), grid, out_dir / f"{stem}.png", title, blocks)
    arrays["grid"] = np.asarray(grid)
    npz = out_dir / f"{stem}.npz"
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays, head=np.asarray(str(head)), image=np.asarray(str(image)),
             labels=np.asarray(labels), runs=np.asarray([str(r) for r in runs]))

    summary = {"image": str(image), "head": str(head), "blocks": blocks, "grid": list(grid), "rows": []}
    for n, m, tag in frozen_rows + run_rows:
        if tag.endswith("-prompts"):
            continue
        summary["rows"].append({
            "label": n, "arrays": tag,
            "cls_to_patches": [round(float(m["cls"][b - 1].sum()), 6) for b in blocks],
            "cls_to_prompts": [round(float(m["cls_to_prompts"][b - 1]), 6) for b in blocks]
            if "cls_to_prompts" in m else [0.0] * len(blocks),
            "cls_to_prefix": [round(float(m["cls_to_prefix"][b - 1]), 6) for b in blocks]})
    js = write_text(out_dir / f"{stem}.json", json.dumps(summary, indent=2) + "\n")
    md_lines = ["| model | block | CLS->patches | CLS->prompts | CLS->CLS/registers |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        for b, p, q, s in zip(blocks, r["cls_to_patches"], r["cls_to_prompts"], r["cls_to_prefix"]):
            md_lines.append(f"| {r['label']} | {b} | {p:.4f} | {q:.4f} | {s:.4f} |")
    md = write_text(out_dir / f"{stem}.md", "\n".join(md_lines) + "\n")
    return {"png": png, "npz": npz, "json": js, "md": md, "arrays": arrays, "summary": summary,
            "method": model0.method, "image": str(image)}

def analyze_attention_images(paths: Sequence[PathLike], out: Optional[PathLike] = None, head: Union[str, int] = "mean",
                             device: Optional[str] = None, blocks: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """``RUN... IMAGE...`` (images or folders of images): :func:`analyze_attention` per image, runs loaded once."""
    runs, images = split_runs_and_images(paths)
    models = [_load_run_for_analysis(r) for r in runs]
    return [analyze_attention(runs, im, out, head, device, blocks, models=models) for im in images]

# -- `gapt reproduce fig5` ---------------------------------------------------------------------
def plan_fig5():
    """MAE on CUB: + GATE (Table 5's settings, learn_temperature=false) and GATE + LT (Ours); rendered by
    :func:`render_fig5`: attention at blocks 3, 7 and 12, frozen MAE first."""
    from ..paper.plans import Plan, RunSpec, plan_table1
    ours = [s for s in plan_table1().specs if s.backbone == "mae_vitb16" and s.task == "cub"
            and s.method.startswith("gated") and s.gate_type == "soft"][0]
    gate = RunSpec(**{**ours.__dict__, "name": ours.name.replace("/ours/", "/gate/"), "row": "+ GATE",
                      "method": "gated", "overrides": list(ours.overrides) + ["learn_temperature=false"]})
    return Plan("fig5", "Fig. 5: attention maps at blocks 3, 7 and 12: frozen MAE, + GATE, + GATE + LT",
                [gate, ours], render=render_fig5,
                notes=["the image: the first test image (sorted by path) under the runs' data.root"])

def first_image(run_dir: PathLike) -> Path:
    """The first image file (sorted by path) under the data.root of a run's config.yaml."""
    from .. import config as C
    from ..data import IMAGE_EXTENSIONS
    cfg = C.load_config(str(Path(run_dir) / "config.yaml"), saved=True)
    root = Path(cfg.data.root or ".")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f"no image under {root} (data.root of {run_dir})")
    return found[0]

def render_fig5(plan, results, out_dir) -> List[Path]:
    runs = []
    for s in plan.specs:
        done = sorted((Path(out_dir) / s.name / "final").glob("seed*/tuned.safetensors"))
        if not done:
            raise ValueError(f"{plan.name}: {s.name} has no finished run under {out_dir} yet")
        runs.append(str(done[0].parent))
    models = [_load_run_for_analysis(r) for r in runs]
    depth = len(models[0][1].backbone.blocks)
    blocks = sorted({max(1, round(b * depth / 12)) for b in (3, 7, 12)})  # the paper's 3, 7, 12 of 12 blocks
    res = analyze_attention(runs, first_image(runs[0]), Path(out_dir) / "figures", blocks=blocks, models=models)
    return [res["md"], res["json"], res["png"], res["npz"]]
