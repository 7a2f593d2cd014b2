"""DA-VPT's init pass before step 0 (SPEC §12.5(a), "Mapping"): which proxy prompt each class is pulled to.

Noahsark/DA-VPT ``model_creator.py::generate_semantic_mapping``: a frozen copy of the pre-trained model
(no prompts, eval mode) runs over ``init_sample_per_class`` training images of every class
(``Dataset/mapping_sampler.py::MappingSampler``: distinct images, or every image repeated plus a draw
when a class has fewer), the class means of its pooled features are accumulated
(``models/vit.py::VisionTransformer.forward_features``: MAE ``norm(mean of the patch tokens)``, MoCo
``norm(x)[:, 0]``), and ``cosine_kmeans`` (LayerNorm-ed features, random classes as first centroids,
20 iterations) assigns every class to one of the ``p_len`` proxies. With fewer classes than
``davpt_proxy_len`` there is nothing to cluster: class c is proxy c (``initial_mapping='all_classes'``).

gapt runs its own backbone prompt-free for the frozen copy: the pre-trained weights, and any other
part of a composed method at its initial value (identity for LoRA, the bias parts and adapters;
SSF's random scale is the one exception). The images go through the training split's transform,
as the authors' ``init_data``. All draws (image sample, k-means) come from the DA-VPT part's generator
seeded with the run's seed; data augmentation runs under ``torch.random.fork_rng`` seeded likewise, so
the caller's RNG is untouched and a run gives the same mapping every time. The result is set on the
model (``model.davpt_mapping``) and returned as a summary for results.json.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset

from ..model.blocks import block_forward
from ..model.parts import BlockCall
from ..model.parts.davpt import DAVPT
from ..model.parts.davpt_loss import class_samples, cosine_kmeans

log = logging.getLogger("gapt")

__all__ = ["davpt_part", "init_davpt", "davpt_record", "frozen_class_features"]


def davpt_part(model) -> Optional[DAVPT]:
    part = model.part("prompts") if hasattr(model, "part") else None
    return part if isinstance(part, DAVPT) else None


def dataset_labels(dataset) -> List[int]:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    if labels is None:  # read every item (slow, but any dataset of (image, label) works)
        labels = [dataset[i][1] for i in range(len(dataset))]
    return [int(y) for y in labels]


@torch.no_grad()
def frozen_features(model, images: torch.Tensor) -> torch.Tensor:
    """Pooled features of the prompt-free backbone (B, D): ``norm(x)[:, 0]`` for CLS pooling, else
    ``norm(mean of the non-prefix tokens)`` (the authors' frozen copy, ``global_pool`` for MAE)."""
    vit = model.backbone
    x = model.embed(images)
    rope = model.rope(x.shape[1] - vit.num_prefix_tokens)
    for blk in vit.blocks:
        x = block_forward(blk, x, BlockCall(rope=rope))
    if model.pooling == "cls":
        return vit.norm(x)[:, 0]
    return vit.norm(x[:, vit.num_prefix_tokens:].mean(dim=1))


@torch.no_grad()
def frozen_class_features(model, dataset, indices: Sequence[int], labels: Sequence[int], num_classes: int,
                          device, batch_size: int = 64) -> torch.Tensor:
    """(num_classes, D) mean frozen feature of each class over ``indices`` (zero rows: classes never seen)."""
    sums = torch.zeros(num_classes, model.embed_dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=0)
    for images, y in loader:
        feats = frozen_features(model, torch.as_tensor(images).to(device)).double().cpu()
        y = torch.as_tensor(y).long().view(-1)
        sums.index_add_(0, y, feats)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.zeros_like(sums)).float()


@torch.no_grad()
def init_davpt(model, dataset, seed: int = 42, device: Union[str, torch.device, None] = None,
               batch_size: int = 64) -> Dict:
    """Set ``model``'s class -> proxy mapping from ``dataset`` (the training split); return a summary."""
    part = davpt_part(model)
    if part is None:
        raise ValueError(f"the DA-VPT init pass needs method da-vpt, got '{getattr(model, 'method', '?')}'")
    part.generator.manual_seed(int(seed))
    classes = int(model.num_classes)
    summary: Dict = {"classes": classes, "proxies": part.proxy_len, "all_classes": part.all_classes}
    if part.all_classes:  # train.py: fewer classes than proxies -> class c is proxy c
        model.davpt_mapping.copy_(torch.arange(classes, device=model.davpt_mapping.device))
        summary.update(images=0, mapping=model.davpt_mapping.tolist())
        return summary
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = dataset_labels(dataset)
    per_class = int(part.settings.davpt_samples_per_class)
    indices = class_samples(labels, classes, per_class, part.generator)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # augmentation draws are seeded; the caller's RNG is untouched
        torch.manual_seed(int(seed))
        feats = frozen_class_features(model, dataset, indices, labels, classes, device, batch_size)
    model.train(was_training)
    centroids, mapping = cosine_kmeans(feats, part.proxy_len, None, part.generator)
    # create_model: the criterion is built with this mapping, then update_mapping() keeps the centroids
    # only when more than one proxy is used
    model.davpt_mapping.copy_(mapping.to(model.davpt_mapping.device))
    taken = part.set_mapping(model, mapping, centroids)
    sizes = torch.bincount(model.davpt_mapping.cpu(), minlength=part.proxy_len).tolist()
    summary.update(images=len(indices), per_class=per_class, mapping=model.davpt_mapping.tolist(),
                   proxy_sizes=sizes, centroids_kept=taken)
    log.info("DA-VPT: %d classes mapped to %d proxies from %d images (%d per class); classes per proxy %s",
             classes, part.proxy_len, len(indices), per_class, sizes)
    return summary


def davpt_record(model, init: Optional[Dict]) -> Dict:
    """results.json's ``davpt`` entry (nothing for other methods): the init pass's summary (None when the run
    was resumed), the final class -> proxy mapping and how often it was re-clustered."""
    part = davpt_part(model)
    if part is None:
        return {}
    return {"davpt": {"init": init, "mapping": model.davpt_mapping.tolist(), "reclustered": part.reclustered}}
