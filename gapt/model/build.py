"""``build_model``: backbone name + checkpoint + method -> PromptedViT; ``load_model`` from a tuned file."""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Union

import torch

from .backbones import BackboneSpec, create_vit, default_pooling, resolve_spec
from .checkpoints import TIMM_FILTERED, convert_checkpoint, filter_with_timm, load_into_vit, read_tensor_file
from ..method import MethodSettings
from .posembed import check_mode, regrid_pos_embed
from .prompted import PromptedViT

log = logging.getLogger("gapt")


def build_backbone(backbone: Union[str, BackboneSpec], weights: Optional[str] = None,
                   image_size: Optional[int] = None, random_seed: Optional[int] = None,
                   pos_embed_interpolation: str = "bicubic"):
    """(timm ViT with weights loaded, its spec).

    ``random_seed`` makes a random backbone (weights=None) reproducible without touching the
    global RNG, so a run's eval/predict can rebuild exactly the backbone it trained.
    ``pos_embed_interpolation``: how a checkpoint's position embedding is resized to
    ``image_size``'s grid (bicubic as timm; bilinear as MMSegmentation's SETR).
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_spec(backbone)
    vit, spec = _build_backbone(spec, weights, image_size, random_seed, check_mode(pos_embed_interpolation))
    vit.pos_embed_interpolation = pos_embed_interpolation  # read by PromptedViT.embed for other grids
    return vit, spec


def _build_backbone(spec: BackboneSpec, weights: Optional[str], image_size: Optional[int],
                    random_seed: Optional[int], pos_embed_interpolation: str):
    if weights == "timm":
        if not spec.timm_name:
            raise ValueError(f"backbone '{spec.name}' has no timm hub weights; pass a checkpoint path")
        if pos_embed_interpolation == "bicubic" or not image_size:
            return create_vit(spec, image_size, pretrained_timm=True), spec
        return regrid_pos_embed(create_vit(spec, None, pretrained_timm=True), image_size,
                                pos_embed_interpolation), spec
    if weights is None and random_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            vit = create_vit(spec, image_size)
    else:
        vit = create_vit(spec, image_size)
    if weights is None:
        warnings.warn(f"backbone '{spec.name}' built with random weights (weights=None)", stacklevel=3)
        return vit, spec
    if spec.checkpoint_format == "google_npz" or str(weights).endswith(".npz"):
        from .google_npz import load_google_npz
        log.info("loaded %s from %s", load_google_npz(vit, weights, spec, pos_embed_interpolation), weights)
        return vit, spec
    raw = read_tensor_file(weights)
    if weights.endswith(".safetensors") or spec.checkpoint_format == "timm":
        fmt = "timm" if spec.checkpoint_format in ("timm", "dino") else spec.checkpoint_format
    else:
        fmt = spec.checkpoint_format
    if fmt in TIMM_FILTERED:  # timm's own conversion first, then the same strict check
        sd, what = filter_with_timm(raw, vit, weights, pos_embed_interpolation)
    else:
        sd, what = convert_checkpoint(raw, fmt, weights)
    load_into_vit(vit, sd, weights, keep_model_pos_embed=spec.sincos_pos_embed, pos_embed_mode=pos_embed_interpolation)
    log.info("loaded %s from %s", what, weights)
    return vit, spec


def build_model(backbone: Union[str, BackboneSpec] = "mae_vitb16", method: Union[str, MethodSettings] = "gated",
                *, num_classes: int = 1000, weights: Optional[str] = None, image_size: Optional[int] = None,
                class_names: Optional[List[str]] = None, random_seed: Optional[int] = None,
                pos_embed_interpolation: str = "bicubic", **settings) -> PromptedViT:
    """A frozen ViT (timm) with one transfer method and a linear head.

    backbone: a registered name (``gapt.model.BACKBONES``, see ``gapt backbones``), a
        :class:`BackboneSpec`, or any timm ViT name.
    method: a ``gapt.method.MethodSettings`` (every method setting below in one object), or a
        method name. Methods: ``linear`` (head only), ``full`` (every backbone weight trained too),
        ``vpt-shallow`` (prompts enter at block 1 and flow through every block),
        ``vpt-deep`` (fresh prompts at every block), ``vpt-at-block`` (prompts enter at
        ``insert_at_block``), ``gated`` (GaPT: vpt-shallow whose prompt update after block l is
        mixed by a learned gate g_l = sigmoid(gamma_l), one per block but the last), and the PEFT
        baselines ``lora`` (on the attention's qkv), ``adaptformer`` (parallel MLP adapter),
        ``bitfit`` (every backbone bias) and ``ssf`` (scale and shift after 8 places). Names compose
        with ``+``: ``"gated+lora"`` is gated prompts on a LoRA-tuned backbone (gapt/method.py says
        which names cannot go together).
    num_prompts: prompt tokens (prompt methods; ignored by linear/full).
    num_classes: outputs of the linear head (fresh: Kaiming-normal weight, bias -log(99)).
    gate_init: gated only (default 10.0): every gamma_l starts at ``-gate_init``, so gates start at
        sigmoid(-gate_init) (5 -> 0.0067, 10 -> 4.5e-5): prompts first pass blocks almost unchanged.
    learn_temperature: also learn one attention temperature per block (AAS), starting at 1 and
        clamped to [0.01, 10]; prompt methods only.
    insert_at_block: vpt-at-block only (1-based, 1..depth); every other method needs 1.
    weights: a checkpoint path (MAE, MoCo v3, DINO, timm state dict / safetensors; a classifier
        head in it is dropped), ``"timm"`` for hub weights, or None for a random backbone (warned).
    image_size: input side in pixels (default: the backbone's); a multiple of the patch size.
        The position embedding of the weights is interpolated to the new grid.
    prompt_dropout: dropout on prompt tokens while training.
    pooling: how tokens become the head's input, after the final LayerNorm: ``cls`` (the CLS
        token), ``mean`` (mean of every token but CLS/registers, prompts included: MAE's rule),
        ``img`` (mean of the patch tokens only), ``prompt`` (mean of the prompt tokens; prompt
        methods only). "" (or None) = the backbone's pretraining rule (MAE: mean; MoCo v3, DINO,
        supervised: cls).
    settings: the method's other settings as keywords (num_prompts, gate_init, gate_type,
        gate_temperature, learn_temperature, insert_at_block, prompt_dropout, pooling: the fields
        of ``gapt.method.MethodSettings``).
    class_names: stored with the model (tuned file metadata, ``gapt predict`` output).
    random_seed: only with ``weights=None``: the random backbone is drawn from this seed,
        without touching the global RNG, so the same seed rebuilds the same backbone.
        Prompts and the head are still drawn from the global RNG. This is why
        ``load_model(f, weights=None)`` gives other logits than the model saved in ``f``: a
        tuned file holds only the tuned tensors, not the frozen backbone, so a random backbone
        is redrawn; pass the run's ``random_seed`` (``train.seed``) to get the same one back,
        or the checkpoint path the run used as ``weights``.
    pos_embed_interpolation: bicubic (timm, classification) or bilinear (SETR, segmentation),
        for the checkpoint's position embedding and for inputs of another patch grid.
    gate_type: ``soft`` (g = sigmoid(gamma)) or ``hard`` (0/1 gates: Gumbel-Sigmoid with temperature
        ``gate_temperature`` and straight-through in training, 1[gamma > 0] in evaluation; SPEC §9).
    gate_temperature: the Gumbel-Sigmoid temperature of hard gates (default 1.0).
    lora_rank, lora_alpha, lora_targets: lora only (defaults 8, 8, ``"qkv"``: one A, B on timm's fused
        qkv as peft; ``"q,v"``: separate q and v updates). B starts at zero: step 0 is the frozen model.
    adapter_dim, adapter_scale, adapter_dropout: adaptformer only (defaults 64, 0.1, 0.1).
    """
    chosen = MethodSettings.of(method, **settings)
    vit, spec = build_backbone(backbone, weights, image_size, random_seed, pos_embed_interpolation)
    return PromptedViT(vit, chosen, pooling=chosen.pooling or default_pooling(spec, vit), num_classes=num_classes,
                       backbone_name=spec.name, class_names=class_names,
                       image_size=image_size or vit.patch_embed.img_size[0])


def load_model(tuned_path: str, weights: Optional[str] = None, random_seed: Optional[int] = None) -> PromptedViT:
    """Rebuild a model from a gapt tuned file's metadata, then load its tuned tensors.

    The tuned file holds prompts, gates, temperatures and the head, not the frozen backbone:
    ``weights`` must be the checkpoint the model was trained from. With ``weights=None`` the
    backbone is random, and only the same ``random_seed`` as in training (``train.seed``)
    rebuilds the backbone the model was trained on (see :func:`build_model`).
    """
    from .tuned import read_tuned_metadata
    meta = read_tuned_metadata(tuned_path)
    with warnings.catch_warnings():
        if weights is None and meta["method"] == "full":
            warnings.simplefilter("ignore")  # a full fine-tune file holds every backbone weight
        model = build_model(meta["backbone"], MethodSettings.of(meta, num_prompts=meta["num_prompts"] or 1),
                            num_classes=meta["num_classes"], weights=weights, image_size=meta["image_size"],
                            class_names=meta["class_names"], random_seed=random_seed)
    model.load_tuned(tuned_path)
    return model
