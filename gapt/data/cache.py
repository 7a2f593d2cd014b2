"""Decoded-image cache and the up-front image check.

Un-augmented splits (every VTAB split, every eval split) are decoded and resized once into
uint8 (N, S, S, 3) arrays; normalisation then happens per item from uint8, so later epochs
decode no JPEG. ``memory`` keeps the array in RAM (shared copy-on-write with forked
DataLoader workers); ``disk`` writes a ``.npy`` file read back as a read-only memmap (each
worker reopens it; nothing large is pickled).

A disk cache is named by a SHA-256 key over (cache format version, the decoder's
description incl. image size, and every file's path, size and mtime), so editing, adding,
removing or reordering an image gives a new key and a stale cache can never be read. Files
are written under a temporary name and renamed into place, so a half-written cache is never
read either (two processes building the same cache both end with identical files).

Images that fail to decode are recorded (index -> reason) rather than raised here; the
caller decides whether that is an error or a skip. The same goes for :func:`check_images`,
which cheaply test-decodes images of augmented splits (JPEGs in draft mode, at 1/8 scale:
the whole entropy-coded stream is still read, so truncated files are caught).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import DataError

log = logging.getLogger("gapt.data")

CACHE_VERSION = 1
MAX_THREADS = 16


def num_threads() -> int:
    # PIL decoding and numpy resizing release the GIL, so threads scale on CPU cores.
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class _Progress:
    """tqdm on a terminal; one log line per step when done, plus a line every 30 s of long steps."""

    EVERY_S = 30.0

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.start, self.done = total, desc, time.time(), 0
        self.last = self.start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last > self.EVERY_S:  # long work: say how far it got
            self.last = time.time()
            log.info("%s: %d/%d images ...", self.desc, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s: %d images in %.1fs", self.desc, self.total, time.time() - self.start)


def run_parallel(fn: Callable[[int], Optional[str]], n: int, desc: str) -> Dict[int, str]:
    """Call ``fn(i)`` for i in range(n) on a thread pool; collect non-None results (errors)."""
    failures: Dict[int, str] = {}
    progress = _Progress(n, desc)
    try:
        threads = num_threads()
        if threads == 1 or n < 2 * threads:
            results = map(fn, range(n))
            for i, err in enumerate(results):
                if err is not None:
                    failures[i] = err
                progress.update()
        else:
            with ThreadPoolExecutor(threads) as pool:
                for i, err in enumerate(pool.map(fn, range(n))):
                    if err is not None:
                        failures[i] = err
                    progress.update()
    finally:
        progress.close()
    return failures


# ------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------

def file_signature(path: str) -> List:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, -1, -1]


def cache_key(paths: Sequence[str], description: str) -> str:
    """SHA-256 over the cache version, the transform description and every file's stat."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "transform": description}).encode())
    for p in paths:
        h.update(json.dumps(file_signature(os.path.abspath(p))).encode())
        h.update(b"\n")
    return h.hexdigest()


def _safe_label(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return keep.strip("._")[:80] or "split"


def default_cache_dir(root: str) -> str:
    return os.path.join(root or ".", ".gapt_cache")


def _ensure_dir(cache_dir: str) -> Path:
    d = Path(cache_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write the disk cache folder {cache_dir} ({describe_error(e)}); "
                        f"set data.cache_dir to a writable folder or use data.cache=memory") from e
    return d


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------
# the cache itself
# ------------------------------------------------------------------------------------------

class _StoredArray:
    """A uint8 array held in memory, or a ``.npy`` file opened lazily as a read-only memmap
    (a DataLoader worker reopens the file; its contents are never pickled)."""

    def __init__(self, data: Optional[np.ndarray] = None, path: Optional[str] = None,
                 description: str = "", key: str = ""):
        self._data = data
        self.path = path
        self.description = description
        self.key = key

    @property
    def mode(self) -> str:
        return "disk" if self.path else "memory"

    @property
    def data(self) -> np.ndarray:
        if self._data is None:  # a worker process after unpickling, or first access
            self._data = np.load(self.path, mmap_mode="r")
        return self._data

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path:
            state["_data"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class ImageCache(_StoredArray):
    """Rows of uint8 (S, S, 3) images."""

    @property
    def array(self) -> np.ndarray:
        return self.data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, row: int) -> np.ndarray:
        return self.data[row]


def _decode_into(array: np.ndarray, paths: Sequence[str], decode: Callable[[str], np.ndarray],
                 desc: str) -> Dict[int, str]:
    def work(i: int) -> Optional[str]:
        try:
            array[i] = decode(paths[i])
        except Exception as e:  # noqa: BLE001 - any decoder failure marks the image bad
            array[i] = 0
            return describe_error(e)
        return None
    return run_parallel(work, len(paths), desc)


def _warn_if_large(nbytes: int, what: str) -> None:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.5 * physical:
        log.warning("the memory cache for %s needs %.1f GB (machine: %.1f GB); "
                    "consider data.cache=disk", what, nbytes / 1e9, physical / 1e9)


def _write_npy(npy: Path, meta_path: Path, shape, fill: Callable[[np.ndarray], Dict[int, str]],
               meta: dict) -> Dict[int, str]:
    """Fill a new uint8 ``.npy`` memmap of ``shape`` under a temporary name, write its metadata
    (with the failures ``fill`` returns), then rename it into place: never half a cache."""
    tmp = npy.with_name(f"{npy.name}.{uuid.uuid4().hex}.tmp.npy")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        failures = fill(array)
        array.flush()
        del array
        _write_json_atomic(meta_path, {**meta, "failures": failures, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.replace(tmp, npy)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.debug("wrote disk cache %s", npy)
    return failures


def build_image_cache(paths: Sequence[str], decoder, mode: str, cache_dir: str = "",
                      label: str = "split", words: str = "") -> "tuple[ImageCache, Dict[int, str]]":
    """Decode every image once with ``decoder.load_uint8``; returns (cache, failures).

    ``mode`` is ``memory`` or ``disk``; ``failures`` maps row -> reason (those rows are zero).
    ``label`` names the cache files; ``words`` (e.g. "the val split (val.json)") the log line.
    """
    s = decoder.image_size
    shape = (len(paths), s, s, 3)
    desc = f"cached {words or label} {'in memory' if mode == 'memory' else 'on disk'} ({decoder.description})"
    if mode == "memory":
        _warn_if_large(int(np.prod(shape)), label)
        array = np.empty(shape, dtype=np.uint8)
        failures = _decode_into(array, paths, decoder.load_uint8, desc)
        return ImageCache(array, description=decoder.description), failures
    if mode != "disk":
        raise ValueError(f"unknown cache mode {mode!r}")

    key = cache_key(paths, decoder.description)
    folder = _ensure_dir(cache_dir)
    stem = f"{_safe_label(label)}-{key[:20]}"
    npy, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    meta = _read_json(meta_path) if npy.exists() else None
    if meta and meta.get("key") == key and meta.get("shape") == list(shape):
        try:
            arr = np.load(npy, mmap_mode="r")
            if tuple(arr.shape) == shape and arr.dtype == np.uint8:
                log.info("using the disk cache of %s (%s)", words or label, npy)
                failures = {int(k): v for k, v in meta.get("failures", {}).items()}
                return ImageCache(path=str(npy), description=decoder.description, key=key), failures
        except (OSError, ValueError):
            pass  # unreadable: rebuild below
    failures = _write_npy(npy, meta_path, shape, lambda array: _decode_into(array, paths, decoder.load_uint8, desc),
                          {"key": key, "shape": list(shape), "transform": decoder.description,
                           "num_images": len(paths)})
    return ImageCache(path=str(npy), description=decoder.description, key=key), failures


# ------------------------------------------------------------------------------------------
# augmented splits: the resized images before the random crop, of varying sizes
# ------------------------------------------------------------------------------------------

class RaggedImageCache(_StoredArray):
    """uint8 images of varying (H, W, 3) in one flat buffer; row i is
    ``buffer[offsets[i]:offsets[i + 1]]`` reshaped to ``shapes[i]``."""

    def __init__(self, shapes: np.ndarray, buffer: Optional[np.ndarray] = None, path: Optional[str] = None,
                 description: str = "", key: str = ""):
        super().__init__(buffer, path, description, key)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(axis=1))])

    @property
    def buffer(self) -> np.ndarray:
        return self.data

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, row: int) -> np.ndarray:
        return self.data[self.offsets[row]:self.offsets[row + 1]].reshape(self.shapes[row])


def _resized_shapes(paths: Sequence[str], augment, words: str = "the split") -> "tuple[np.ndarray, Dict[int, str]]":
    """Each image's size after the resize, from its header alone (no decoding)."""
    shapes = np.zeros((len(paths), 3), dtype=np.int64)

    def work(i: int) -> Optional[str]:
        try:
            with Image.open(paths[i]) as im:
                shapes[i] = augment.resized_shape(*im.size)
        except Exception as e:  # noqa: BLE001 - unreadable header: a bad image
            return describe_error(e)
        return None
    failures = run_parallel(work, len(paths), f"read the image sizes of {words}")
    shapes[list(failures)] = 0
    return shapes, failures


def _fill_ragged(cache: RaggedImageCache, buffer: np.ndarray, paths: Sequence[str], augment,
                 failures: Dict[int, str], desc: str) -> Dict[int, str]:
    def work(i: int) -> Optional[str]:
        if i in failures:
            return failures[i]
        try:
            img = augment.load_resized_uint8(paths[i])
            if img.shape != tuple(cache.shapes[i]):
                return f"decoded to {img.shape}, but its header promised {tuple(cache.shapes[i])}"
            buffer[cache.offsets[i]:cache.offsets[i + 1]] = img.reshape(-1)
        except Exception as e:  # noqa: BLE001 - any decoder failure marks the image bad
            return describe_error(e)
        return None
    return run_parallel(work, len(paths), desc)


def build_resized_cache(paths: Sequence[str], augment, mode: str, cache_dir: str = "",
                        label: str = "split", words: str = "") -> "tuple[RaggedImageCache, Dict[int, str]]":
    """Decode and resize every image of an augmented split once (``augment.load_resized_uint8``);
    the random crop and flip are still drawn per access. Returns (cache, failures)."""
    description = f"{augment.description} (cached before the random crop)"
    if mode not in ("memory", "disk"):
        raise ValueError(f"unknown cache mode {mode!r}")
    key = cache_key(paths, description)
    desc = (f"cached {words or label} {'in memory' if mode == 'memory' else 'on disk'} "
            f"({augment.description}, resized before the random crop)")
    if mode == "disk":
        folder = _ensure_dir(cache_dir)
        stem = f"{_safe_label(label)}-{key[:20]}"
        npy, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
        meta = _read_json(meta_path) if npy.exists() else None
        if meta and meta.get("key") == key:
            try:
                cache = RaggedImageCache(np.asarray(meta["shapes"]), path=str(npy), description=description, key=key)
                if cache.buffer.shape == (cache.offsets[-1],) and cache.buffer.dtype == np.uint8:
                    log.info("using the disk cache of %s (%s)", words or label, npy)
                    return cache, {int(k): v for k, v in meta.get("failures", {}).items()}
            except (OSError, ValueError, KeyError):
                pass  # unreadable: rebuild below
    shapes, failures = _resized_shapes(paths, augment, words or label)
    cache = RaggedImageCache(shapes, description=description, key=key)
    total = int(cache.offsets[-1])
    if mode == "memory":
        _warn_if_large(total, label)
        cache._data = np.empty(total, dtype=np.uint8)
        return cache, _fill_ragged(cache, cache._data, paths, augment, failures, desc)
    header_failures = failures
    failures = _write_npy(npy, meta_path, (total,),
                          lambda buffer: _fill_ragged(cache, buffer, paths, augment, header_failures, desc),
                          {"key": key, "shapes": shapes.tolist(), "transform": description, "num_images": len(paths)})
    cache.path = str(npy)
    return cache, failures


# ------------------------------------------------------------------------------------------
# cheap check for images that are not cached (augmented splits, data.cache=none)
# ------------------------------------------------------------------------------------------

def check_image(path: str) -> Optional[str]:
    """None if ``path`` decodes, else the reason. JPEGs decode at 1/8 scale (draft mode)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return describe_error(e)
    return None


def check_images(paths: Sequence[str], label: str = "split", marker_dir: str = "", words: str = "") -> Dict[int, str]:
    """Test-decode every image; returns row -> reason for the bad ones.

    With ``marker_dir`` (disk cache mode) the result is remembered under a key of the file
    stats, so an unchanged split is not checked again.
    """
    marker = None
    if marker_dir:
        key = cache_key(paths, "check-images")
        marker = _ensure_dir(marker_dir) / f"{_safe_label(label)}-{key[:20]}.checked.json"
        meta = _read_json(marker) if marker.exists() else None
        if meta and meta.get("key") == key:
            return {int(k): v for k, v in meta.get("failures", {}).items()}
    failures = run_parallel(lambda i: check_image(paths[i]), len(paths), f"checked that {words or label} decodes")
    if marker is not None:
        _write_json_atomic(marker, {"key": key, "failures": failures})
    return failures
