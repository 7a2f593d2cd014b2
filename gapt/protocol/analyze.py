"""What a tuned model learned and where prompts help: ``gapt analyze gates | attention | insertion``.

- :func:`analyze_gates`: per block the gate g_l, the selection ratio r_l (SPEC §2) and the
  temperature tau_l of one or more runs: a Markdown table (gates.md), the exact numbers
  (gates.json) and a bar chart in the style of the paper's Fig. 4 (gates.png). A run without
  gates but with learned temperatures shows its temperatures only; a run with neither is an
  error naming it.
- :func:`analyze_attention`: per block, the attention from CLS (and, averaged over the prompt
  rows, from the prompts) to the image patches, for the tuned model beside the frozen backbone
  run without prompts or temperatures: one PNG grid and the raw maps as .npz.
- :func:`insertion_sweep`: the insertion-location sweep of the paper's Fig. 1, one ordinary
  training run ``vpt-at-block`` per block k, then top-1 against k (PNG, JSON, table).

Figures are drawn on matplotlib's Agg canvas directly (pyplot's global state is left alone).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as C
from .gates_plot import save_png

log = logging.getLogger("gapt")

PathLike = Union[str, Path]


# -- shared -----------------------------------------------------------------------------------
def run_labels(runs: Sequence[PathLike]) -> List[str]:
    """Each run's folder name; where two runs share a name, as many trailing path parts as make them differ."""
    paths = [Path(r).resolve() for r in runs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def _new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


# -- gates ------------------------------------------------------------------------------------
def gate_values(run_dir: PathLike) -> Dict[str, Any]:
    """Gates, selection ratios and temperatures of a finished run (classification or
    segmentation), read from its tuned file.

    Only the tuned tensors are read (no backbone checkpoint is needed). For a gated run this is
    :func:`gapt.model.selection.selection_ratio` of the tuned (best-val) state plus ``method``;
    a run with learned temperatures but no gates gets empty gate lists and
    ``inserted_prompt_weight`` NaN. A run with neither raises ValueError naming it.
    """
    from types import SimpleNamespace

    from ..engine import runfolder as rf
    from ..model.selection import selection_ratio
    from ..model.tuned import read_encoder_tuned

    run = Path(run_dir)
    tuned = run / rf.TUNED
    if not tuned.is_file():
        raise rf.RunFolderError(f"{run_dir} has no {rf.TUNED} (not a gapt run folder, or the run is not finished)")
    meta, tensors = read_encoder_tuned(str(tuned))  # classification and segmentation runs alike
    gate_logits, temperature = tensors.get("gate_logits"), tensors.get("temperature")
    method = meta.get("method", "?")
    if gate_logits is None and temperature is None:
        raise ValueError(f"run {run_dir} (method '{method}') has no gates and no learned temperatures: "
                         f"`gapt analyze gates` needs a gated run (method=gated) or learn_temperature=true")
    if gate_logits is not None:
        values = selection_ratio(SimpleNamespace(gate_logits=gate_logits, temperature=temperature, method=method))
    else:
        values = {"gate": [], "block_weight": [], "selection_ratio": [], "inserted_prompt_weight": float("nan"),
                  "temperature": temperature.detach().clamp(0.01, 10.0).tolist()}
    values["method"] = method
    values["learn_temperature"] = temperature is not None
    values["depth"] = meta.get("depth")
    return values


def analyze_gates(runs: Sequence[PathLike], out: Optional[PathLike] = None) -> Dict[str, Any]:
    """Table (gates.md, also returned), numbers (gates.json) and chart (gates.png) for ``runs``.

    ``out`` defaults to ``<run>/analysis`` for one run and ``analysis`` for several.
    Returns ``{"entries": [(label, values)], "table": str, "png": Path, "md": Path, "json": Path}``.
    """
    from .gates_plot import gates_table, plot_gates

    runs = list(runs)
    if not runs:
        raise ValueError("no run folders given")
    out_dir = Path(out) if out else (Path(runs[0]) / "analysis" if len(runs) == 1 else Path("analysis"))
    entries = []
    for label, run in zip(run_labels(runs), runs):
        values = gate_values(run)
        entries.append((label if values["gate"] else f"{label} (no gates)", values))
    # A run without gates is drawn and tabulated with NaN gates (no bar, "—" in the table) so that it keeps
    # its own colour in the legend; gates.json keeps its empty gate lists.
    shown = [(label, values if values["gate"] else
              {**values, "gate": [float("nan")] * (len(values["temperature"]) - 1),
               "selection_ratio": [float("nan")] * (len(values["temperature"]) - 1)})
             for label, values in entries]
    table = gates_table(shown)
    png = plot_gates(shown, out_dir / "gates.png")
    md = _write_text(out_dir / "gates.md", table)

    def finite(v):  # standard JSON: NaN (no gates, so no inserted-prompt weight) -> null
        return None if isinstance(v, float) and math.isnan(v) else v
    js = _write_text(out_dir / "gates.json", json.dumps(
        {"runs": [{"label": label, "run": str(run), **{k: finite(v) for k, v in values.items()}}
                  for (label, values), run in zip(entries, runs)]}, indent=2) + "\n")
    return {"entries": entries, "table": table, "png": png, "md": md, "json": js}


# -- attention --------------------------------------------------------------------------------
def _frozen_counterpart(cfg, model):
    """The backbone without prompts or temperatures. Prompt methods share the tuned model's own
    (frozen) backbone module, so the weights are identical by construction and nothing is loaded
    twice; a full fine-tune changed its backbone, so the pretrained one is built from cfg.weights."""
    from ..model import PromptedViT, build_model
    if model.method == "full":
        with warnings.catch_warnings():
            if cfg.weights is None:
                warnings.simplefilter("ignore")
            return build_model(cfg.backbone, method="linear", weights=cfg.weights, image_size=cfg.image_size,
                               num_classes=model.num_classes, random_seed=cfg.train.seed).eval()
    return PromptedViT(model.backbone, method="linear", num_classes=model.num_classes, pooling=model.pooling,
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
                   out_png: PathLike, title: str = "") -> Path:
    """A grid: one row per (name, (L, N) maps), one column per block; each map min-max scaled on its own,
    upsampled bilinearly over ``picture`` (H, W, 3 in [0, 1])."""
    blocks = rows[0][1].shape[0]
    fig = _new_figure(1.45 * blocks + 1.0, 1.55 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), blocks, squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for b in range(blocks):
            ax = axes[r, b]
            _overlay(ax, picture, maps[b], grid)
            if r == 0:
                ax.set_title(f"block {b + 1}", fontsize=8)
            if b == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, out_png)


def _display_picture(x: torch.Tensor) -> np.ndarray:
    from ..data import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def analyze_attention(run_dir: PathLike, image: PathLike, out: Optional[PathLike] = None,
                      head: Union[str, int] = "mean", device: Optional[str] = None) -> Dict[str, Any]:
    """Attention maps of the tuned run beside its frozen backbone for one image.

    Writes ``attention_<image stem>.png`` (rows: tuned CLS, tuned prompts (prompt methods only),
    frozen CLS; columns: blocks) and ``attention_<image stem>.npz`` (arrays ``tuned_<k>`` and
    ``frozen_<k>`` for every key of :func:`attention_summary`, plus ``grid``, ``head``, ``image``)
    into ``out`` (default ``<run>/analysis``). Returns the arrays and the two paths.
    """
    from PIL import Image

    from ..data import eval_transform
    from ..engine.trainer import resolve_device

    head = head if head == "mean" else int(head)
    if not Path(image).is_file():
        raise FileNotFoundError(f"image not found: {image}")
    cfg, model, results = _load_run_for_analysis(run_dir)
    info = results.get("data") or {"format": cfg.data.format, "name": cfg.data.name}
    try:
        pil = Image.open(image).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {image}: {e}") from None
    x = eval_transform(info, cfg.image_size)(pil)
    dev = torch.device(device) if device else resolve_device(cfg)
    model.to(dev)
    frozen = _frozen_counterpart(cfg, model).to(dev)
    tuned_maps = attention_summary(model, x.to(dev), head)
    frozen_maps = attention_summary(frozen, x.to(dev), head)
    grid = tuple(int(v) for v in tuned_maps["grid"])

    out_dir = Path(out) if out else Path(run_dir) / "analysis"
    stem = Path(image).stem
    rows = [("tuned: CLS", tuned_maps["cls"])]
    if model.num_prompts:
        rows.append(("tuned: prompts (mean)", tuned_maps["prompts"]))
    rows.append(("frozen: CLS", frozen_maps["cls"]))
    title = (f"{Path(run_dir).name} ({model.method}{'+temperature' if model.learn_temperature else ''}), "
             f"{Path(image).name}, head {head}")
    png = plot_attention(rows, _display_picture(x), grid, out_dir / f"attention_{stem}.png", title)
    arrays = {f"tuned_{k}": v for k, v in tuned_maps.items() if k != "grid"}
    arrays.update({f"frozen_{k}": v for k, v in frozen_maps.items()
                   if k in ("cls", "cls_heads", "cls_to_prefix")})  # no prompts there
    arrays["grid"] = np.asarray(grid)
    npz = out_dir / f"attention_{stem}.npz"
    np.savez(npz, **arrays, head=np.asarray(str(head)), image=np.asarray(str(image)))
    return {"png": png, "npz": npz, "arrays": arrays, "method": model.method}


# -- insertion sweep --------------------------------------------------------------------------
_CACHE_LOG = re.compile(r"cached the output of (\d+) frozen block")
# Keys that may differ between a sweep's config and a run folder it finds without making it another run.
_RUN_INDEPENDENT = ("out", "device", "data.num_workers", "data.cache", "data.cache_dir", "train.eval_batch_size")


class _CacheLogWatcher(logging.Handler):
    """Reads the trainer's 'cached the output of N frozen block(s)' line while one run trains."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.blocks: Optional[int] = None

    def emit(self, record: logging.LogRecord) -> None:
        m = _CACHE_LOG.search(record.getMessage())
        if m:
            self.blocks = int(m.group(1))


@contextmanager
def _watch_prefix_cache():
    logger = logging.getLogger("gapt")
    watcher, level = _CacheLogWatcher(), logger.level
    logger.addHandler(watcher)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


def backbone_depth(cfg) -> int:
    from ..model.backbones import create_vit, resolve_spec
    spec = resolve_spec(cfg.backbone)
    if spec.arch.get("depth"):
        return int(spec.arch["depth"])
    return len(create_vit(spec, cfg.image_size).blocks)


def parse_blocks(text: str) -> List[int]:
    """``"1,2,5"`` or ``"1-4,6"`` -> sorted distinct block numbers."""
    blocks = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ValueError
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
        except ValueError:
            raise ValueError(f"--blocks: cannot read {part!r}; give block numbers like 1,2,5 or 1-4") from None
    if not blocks:
        raise ValueError("--blocks: no block numbers given")
    return sorted(blocks)


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _check_same_run(run_dir: Path, cfg) -> None:
    """A folder found on disk must hold the run this sweep would start, or resuming / skipping lies."""
    from ..engine import runfolder as rf
    saved_path = run_dir / rf.CONFIG
    if not saved_path.is_file():
        return
    saved, wanted = _flat(C.to_dict(C.load_config(str(saved_path)))), _flat(C.to_dict(cfg))
    differ = [k for k in wanted if k not in _RUN_INDEPENDENT and saved.get(k) != wanted[k]]
    if differ:
        raise ValueError(f"{run_dir} holds a run with another config (differs in: "
                         + ", ".join(f"{k}: {saved.get(k)!r} there vs {wanted[k]!r} here" for k in differ)
                         + "); choose another out=... for this sweep")


def insertion_config(cfg, block: int):
    """The run of the sweep at block ``block``: vpt-at-block k, out=<cfg.out>/insert_<k>."""
    return replace(cfg, method="vpt-at-block", insert_at_block=int(block), out=str(Path(cfg.out) / f"insert_{block}"))


def insertion_sweep(cfg, blocks: Optional[Iterable[int]] = None, train_fn=None) -> Dict[str, Any]:
    """Train (or pick up) vpt-at-block k for every k in ``blocks`` (default 1..L), then plot top-1 vs k.

    A run folder with results.json is skipped, one with a resume file is resumed, anything else
    is trained from scratch; a folder holding a run of a different config is an error. Writes
    ``insertion.json``, ``insertion.md`` and ``insertion.png`` into ``cfg.out``. Each row records
    ``prefix_cache_blocks``: how many frozen blocks the engine computed once instead of every
    epoch, as reported by the run (results.json key, or the trainer's log line while it trains
    here; None when neither says).
    """
    from ..engine import distributed as dist
    from ..engine import runfolder as rf
    from ..engine.trainer import train as engine_train

    train_fn = train_fn or engine_train
    depth = backbone_depth(cfg)
    blocks = list(range(1, depth + 1)) if blocks is None else sorted(set(int(b) for b in blocks))
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"--blocks {bad}: the backbone {cfg.backbone} has blocks 1..{depth}")
    if cfg.method != "vpt-at-block":
        log.info("insertion sweep: method %s -> vpt-at-block (one run per insertion block)", cfg.method)
    out = Path(cfg.out)
    known_cache = _previous_cache_records(out / "insertion.json")
    rows = []
    for k in blocks:
        cfg_k = insertion_config(cfg, k)
        run_dir = Path(cfg_k.out)
        _check_same_run(run_dir, cfg_k)
        cache_blocks = None
        start = time.time()
        if (run_dir / rf.RESULTS).exists():
            status = "skipped (finished)"
            cache_blocks = known_cache.get(str(run_dir))  # what an earlier sweep saw while it trained
            log.info("insertion sweep: k=%d already finished in %s", k, run_dir)
        else:
            resume = (run_dir / rf.RESUME).exists()
            status = "resumed" if resume else "trained"
            log.info("insertion sweep: k=%d %s -> %s", k, "resuming" if resume else "training", run_dir)
            with _watch_prefix_cache() as watcher:
                train_fn(cfg_k, resume=resume)
            cache_blocks = watcher.blocks if watcher.blocks is not None else 0
        results = rf.read_json(run_dir / rf.RESULTS)
        if "prefix_cache_blocks" in results:  # the engine's own record wins when it has one
            cache_blocks = results["prefix_cache_blocks"]
        metrics = results.get("metrics", {})
        rows.append({"block": k, "run": str(run_dir), "status": status,
                     "test_top1": metrics.get("test_top1"), "val_top1": metrics.get("val_top1_best"),
                     "test_top1_last": metrics.get("test_top1_last"),
                     "train_time_s": results.get("train_time_s"), "wall_time_s": round(time.time() - start, 3),
                     "prefix_cache_blocks": cache_blocks, "tuned_params": results.get("tuned_params")})
    summary = {"backbone": cfg.backbone, "depth": depth, "data": {"format": cfg.data.format, "name": cfg.data.name},
               "seed": cfg.train.seed, "learn_temperature": cfg.learn_temperature, "prompt_init": cfg.prompt_init,
               "num_prompts": cfg.num_prompts, "runs": rows}
    if dist.is_main():
        summary["table"] = insertion_table(rows)
        _write_text(out / "insertion.json", json.dumps(summary, indent=2) + "\n")
        _write_text(out / "insertion.md", summary["table"])
        summary["png"] = str(plot_insertion(rows, out / "insertion.png",
                                            title=f"{cfg.backbone}, {cfg.data.name or cfg.data.format}: vpt@k"))
    return summary


def _previous_cache_records(path: Path) -> Dict[str, int]:
    try:
        rows = json.loads(path.read_text())["runs"]
        return {r["run"]: r["prefix_cache_blocks"] for r in rows if r.get("prefix_cache_blocks") is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def insertion_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| insert at block k | val top-1 | test top-1 | train time (s) | cached frozen blocks | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cache = "—" if r["prefix_cache_blocks"] is None else str(r["prefix_cache_blocks"])
        lines.append(f"| {r['block']} | {_fmt(r['val_top1'])} | {_fmt(r['test_top1'])} | "
                     f"{_fmt(r['train_time_s'], 1)} | {cache} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot_insertion(rows: Sequence[Dict[str, Any]], out_png: PathLike, title: str = "") -> Path:
    """Top-1 (test, and val when known) against the insertion block k (paper Fig. 1)."""
    fig = _new_figure(max(5.0, 0.45 * len(rows) + 3.0), 3.6)
    ax = fig.subplots()
    ks = [r["block"] for r in rows]
    for key, name, style in (("test_top1", "test top-1", "o-"), ("val_top1", "val top-1 (best)", "s--")):
        ys = [float("nan") if r[key] is None else r[key] for r in rows]
        if any(not math.isnan(y) for y in ys):
            ax.plot(ks, ys, style, label=name)
    ax.set_xticks(ks)
    ax.set_xlabel("prompts inserted at block k (vpt@k; k=1 is vpt-shallow)")
    ax.set_ylabel("top-1 (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, out_png)
