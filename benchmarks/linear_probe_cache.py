"""linear_probe_cache: linear probing on cached pooled features vs re-running the frozen backbone every epoch.

Both paths train the head with the engine's ``train_one_epoch`` for the same number of epochs
over the same images. The cached path first runs the engine's ``precompute_frozen`` (for
``method=linear`` that is the backbone's pooled features, once) and its time counts in the
cached total; the baseline runs the backbone in every epoch.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from typing import List, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import Clock, Result, build, main_for, paired, quiet, resolve_device, vit_name

NAME = "linear_probe_cache"


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vitb16", epochs: Optional[int] = None, num_images: Optional[int] = None,
        batch: Optional[int] = None, image_size: Optional[int] = None, repeats: Optional[int] = None,
        **_) -> List[Result]:
    from gapt.engine.schedule import LRSchedule
    from gapt.engine.trainer import precompute_frozen, train_one_epoch

    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    cuda = device.type == "cuda"
    epochs = epochs or (3 if quick else 10)
    batch = batch or (64 if cuda else 4)
    num_images = num_images or (4 * batch if cuda else (4 if quick else 16))
    repeats = repeats or (1 if quick else 2)
    model = build(backbone, method="linear", num_classes=10, image_size=image_size).to(device)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(num_images, 3, model.image_size, model.image_size, generator=g),
                         torch.randint(0, 10, (num_images,), generator=g))
    amp = torch.bfloat16 if cuda else None
    opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=1e-3, momentum=0.9)
    steps = len(DataLoader(data, batch_size=batch))
    schedule = LRSchedule(1e-3, epochs, 0, steps)

    def train(forward, dataset):
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
        for e in range(epochs):
            train_one_epoch(model, forward, loader, opt, schedule, e, device, amp)

    def backbone_every_epoch():
        with quiet():
            train(model, data)

    def cached_features():
        with quiet():
            model.eval()
            features = precompute_frozen(model, data, batch, device, amp, "cache features")
            train(model.forward_from_frozen, features)

    with torch.no_grad():  # one forward first, so neither path pays for first-call set-up
        model.eval()(data.tensors[0][:batch].to(device))
    t = paired(backbone_every_epoch, cached_features, repeats, clock, warmup=0)
    precision = "bf16 autocast" if cuda else "fp32"
    detail = (f"{epochs} epochs of head training on {num_images} images, cached pooled features (build included) vs "
              f"the frozen backbone every epoch, engine train_one_epoch, {vit_name(model)}, batch {batch}, "
              f"{precision}, {clock.describe()}: {t.baseline_s:.2f}s -> {t.candidate_s:.2f}s, {t.spread()}")
    return [Result(NAME, t.ratio, detail, extra={"timing": t})]


def _args(p):
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
