"""``ImageListDataset``: a list of image files with integer labels, as a torch Dataset."""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch.utils.data import Dataset

from .cache import ImageCache, describe_error
from .errors import DataError
from .transforms import FixedSizeDecoder, TrainAugment, load_rgb, to_normalised_tensor


class ImageListDataset(Dataset):
    """Items are ``(float32 (3, S, S) ImageNet-normalised tensor, int label)``.

    Exactly one of ``augment`` (random training transform) and ``decoder`` (deterministic
    transform) is given. With a ``cache`` the deterministic part's uint8 output is read from
    it (``rows[i]`` is item i's row) instead of decoding the file: the decoder's whole output,
    or the augmentation's resized image, to which the random crop and flip are then applied.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *,
                 augment: Optional[TrainAugment] = None, decoder: Optional[FixedSizeDecoder] = None,
                 cache: Optional[ImageCache] = None, rows: Optional[Sequence[int]] = None,
                 split: str = ""):
        if (augment is None) == (decoder is None):
            raise ValueError("give exactly one of augment and decoder")
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        if cache is not None and (rows is None or len(rows) != len(paths)):
            raise ValueError("a cache needs one row per item")
        self.paths: List[str] = list(paths)
        self.labels: List[int] = [int(y) for y in labels]
        self.classes: List[str] = list(class_names)
        self.augment = augment
        self.decoder = decoder
        self.cache = cache
        self.rows = list(rows) if rows is not None else None
        self.split = split
        self.augmented: bool = augment is not None

    @property
    def targets(self) -> List[int]:
        return self.labels

    @property
    def transform(self):
        return self.augment if self.augment is not None else self.decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        label = self.labels[index]
        if self.cache is not None:
            row = self.cache[self.rows[index]]
            if self.augment is not None:
                return self.augment.from_resized(row), label
            return to_normalised_tensor(row), label
        path = self.paths[index]
        try:
            if self.augment is not None:
                return self.augment(load_rgb(path)), label
            return to_normalised_tensor(self.decoder.load_uint8(path)), label
        except OSError as e:  # the file changed after the dataset was checked
            raise DataError(f"cannot read image {path}: {describe_error(e)}") from e

    def __repr__(self) -> str:
        how = "cached " + self.cache.mode if self.cache is not None else "uncached"
        return (f"ImageListDataset(split={self.split!r}, {len(self)} images, {len(self.classes)} classes, "
                f"{self.transform!r}, {how})")

