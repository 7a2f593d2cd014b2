"""gapt.data: every format on tiny on-the-fly images, transforms, errors, skipping, caches."""
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gapt.config import DataConfig
from gapt.data import (FGVC_DATASETS, VTAB_TASKS, DataError, DatasetBundle, build_datasets, eval_transform,
                       stratified_carve, tf_resize_bilinear)
from gapt.data.transforms import IMAGENET_MEAN, IMAGENET_STD

S = 32  # image size used throughout: resize 36 -> crop 32


def write_image(path, seed=0, size=(40, 30), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def cfg(**kw):
    kw.setdefault("cache", "none")
    return DataConfig(**kw)


def normalise(arr_hwc_uint8):
    t = torch.from_numpy(arr_hwc_uint8.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------

@pytest.fixture
def fgvc_root(tmp_path):
    """Generic VPT-JSON dataset: class ids {3, 7, 12}, images under the root."""
    root = tmp_path / "birds"
    ids = {"a_sparrow": 3, "b_wren": 7, "c_finch": 12}
    splits = {"train": {}, "val": {}, "test": {}}
    n = 0
    for cls, cid in ids.items():
        for split, count in (("train", 3), ("val", 1), ("test", 2)):
            for _ in range(count):
                rel = f"{cls}/img_{n:03d}.jpg"
                write_image(str(root / rel), seed=n)
                splits[split][rel] = cid
                n += 1
    for split, d in splits.items():
        (root / f"{split}.json").write_text(json.dumps(d, indent=1))
    return root


def make_vtab(base, task="dtd", counts=None, labels=None, ext="png"):
    counts = counts or {"train800": 6, "val200": 3, "test": 4}
    folder = base / task
    lines_all = {}
    n = 0
    for split, count in counts.items():
        lines = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.{ext}"
            write_image(str(folder / rel), seed=100 + n, size=(40, 30))
            label = labels[n % len(labels)] if labels else n % 3
            lines.append(f"{rel} {label}")
            n += 1
        lines_all[split] = lines
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "train800val200.txt").write_text("\n".join(lines_all["train800"] + lines_all["val200"]) + "\n")
    return folder


@pytest.fixture
def vtab_root(tmp_path):
    make_vtab(tmp_path / "vtab")
    return tmp_path / "vtab"


def make_folder(root, classes=("cat", "dog", "eel"), per_class=10, ext="jpg"):
    n = 0
    for cls in classes:
        for i in range(per_class):
            write_image(str(root / cls / f"{i:03d}.{ext}"), seed=500 + n)
            n += 1
    return root


# ------------------------------------------------------------------------------------------
# FGVC
# ------------------------------------------------------------------------------------------

def test_registries_match_spec():
    assert {k: v[0] for k, v in FGVC_DATASETS.items()} == {"cub": 200, "nabirds": 555, "flowers": 102,
                                                           "dogs": 120, "cars": 196}
    assert {k: v[1] for k, v in FGVC_DATASETS.items()} == {"cub": "images", "nabirds": "images", "flowers": ".",
                                                           "dogs": "Images", "cars": "."}
    assert len(VTAB_TASKS) == 19
    groups = {}
    for name, (c, g) in VTAB_TASKS.items():
        groups.setdefault(g, []).append(name)
    assert [len(groups[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert VTAB_TASKS["cifar"] == (100, "natural") and VTAB_TASKS["sun397"] == (397, "natural")
    assert VTAB_TASKS["diabetic_retinopathy"] == (5, "specialized")
    assert VTAB_TASKS["smallnorb_azi"] == (18, "structured") and VTAB_TASKS["clevr_count"] == (8, "structured")


def test_fgvc_reads_splits_with_contiguous_labels(fgvc_root):
    b = build_datasets(cfg(format="fgvc", root=str(fgvc_root)), image_size=S)
    assert isinstance(b, DatasetBundle)
    assert b.num_classes == 3
    assert b.class_names == ["a_sparrow", "b_wren", "c_finch"]  # ids 3, 7, 12 -> 0, 1, 2
    assert (len(b.train), len(b.val), len(b.test)) == (9, 3, 6)
    train = json.loads((fgvc_root / "train.json").read_text())
    for path, label in zip(b.train.paths, b.train.labels):
        rel = os.path.relpath(path, fgvc_root)
        assert {3: 0, 7: 1, 12: 2}[train[rel]] == label
    x, y = b.test[0]
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and isinstance(y, int)
    assert b.train.augmented and not b.val.augmented and not b.test.augmented
    info = b.info
    assert info["format"] == "fgvc" and info["splits"] == {"train": "train.json", "val": "val.json",
                                                           "test": "test.json"}
    assert (info["num_train"], info["num_val"], info["num_test"], info["skipped_images"]) == (9, 3, 6, 0)
    assert info["resize"].startswith("resize 36 + random crop 32") and info["normalisation"] == "imagenet mean/std"
    json.dumps(info)  # results.json-ready


def test_fgvc_named_dataset_uses_its_image_folder_and_class_count(tmp_path):
    root = tmp_path / "Stanford-dogs"
    entries = {}
    for i, cls in enumerate(["n01-chihuahua", "n02-pug"]):
        rel = f"{cls}/x{i}.jpg"
        write_image(str(root / "Images" / rel), seed=i)
        entries[rel] = i
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(entries))
    b = build_datasets(cfg(format="fgvc", name="dogs", root=str(root), final=True), image_size=S)
    assert b.num_classes == 120 and len(b.class_names) == 120
    assert b.class_names[:2] == ["n01-chihuahua", "n02-pug"]
    assert all(p.startswith(str(root / "Images")) for p in b.train.paths)
    assert any("2 of 120 class ids" in n for n in b.info["notes"])
    assert any("final run" in n for n in b.info["notes"])
    assert b.info["splits"]["train"] == "train.json"  # the reference's final FGVC run: train.json alone


def test_fgvc_split_override_and_errors(fgvc_root):
    (fgvc_root / "trainval.json").write_text((fgvc_root / "train.json").read_text())
    b = build_datasets(cfg(format="fgvc", root=str(fgvc_root), train_split="trainval"), image_size=S)
    assert b.info["splits"]["train"] == "trainval.json"
    with pytest.raises(DataError, match=r"missing split file .*nope\.json"):
        build_datasets(cfg(format="fgvc", root=str(fgvc_root), val_split="nope"), image_size=S)
    with pytest.raises(DataError, match=r"unknown FGVC dataset .*'birdz'.*cub, nabirds, flowers, dogs, cars"):
        build_datasets(cfg(format="fgvc", name="birdz", root=str(fgvc_root)), image_size=S)
    with pytest.raises(DataError, match=r"image folder not found: .*birds/images"):
        build_datasets(cfg(format="fgvc", name="cub", root=str(fgvc_root)), image_size=S)


def test_fgvc_too_many_class_ids_names_file_and_line(tmp_path):
    root = tmp_path / "flowers"
    d = {}
    for i in range(3):
        rel = f"jpg/im{i}.jpg"
        write_image(str(root / rel), seed=i)
        d[rel] = i
    for split in ("val", "test"):
        (root / f"{split}.json").write_text(json.dumps(d, indent=1))
    big = dict(d)
    big["jpg/im2.jpg"] = 999  # 103 distinct ids for a 102-class dataset once combined below
    big.update({f"jpg/extra{i}.jpg": 100 + i for i in range(101)})
    (root / "train.json").write_text(json.dumps(big, indent=1))
    with pytest.raises(DataError, match=r"train\.json line \d+: class id \d+ maps to label 102, outside \[0, 102\)"):
        build_datasets(cfg(format="fgvc", name="flowers", root=str(root)), image_size=S)
    (root / "train.json").write_text('{\n "jpg/im0.jpg": 0,\n "jpg/im1.jpg": "x"\n}')
    with pytest.raises(DataError, match=r"train\.json line 3: class id 'x'"):
        build_datasets(cfg(format="fgvc", name="flowers", root=str(root)), image_size=S)
    (root / "train.json").write_text('{\n "jpg/im0.jpg": 0,\n')
    with pytest.raises(DataError, match=r"train\.json line \d+: not valid JSON"):
        build_datasets(cfg(format="fgvc", name="flowers", root=str(root)), image_size=S)


def test_fgvc_train_is_random_and_eval_deterministic(fgvc_root):
    b = build_datasets(cfg(format="fgvc", root=str(fgvc_root)), image_size=S)
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert all(d.shape == (3, S, S) for d in draws)
    assert torch.equal(b.val[0][0], b.val[0][0])


def test_fgvc_eval_matches_torchvision_and_eval_transform(fgvc_root):
    import torchvision.transforms as T
    b = build_datasets(cfg(format="fgvc", root=str(fgvc_root)), image_size=S)
    ref = T.Compose([T.Resize(36), T.CenterCrop(S), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    img = Image.open(b.test.paths[1]).convert("RGB")
    x, _ = b.test[1]
    assert torch.equal(x, ref(img))
    info = json.loads(json.dumps(b.info))  # as read back from results.json
    assert torch.equal(eval_transform(info, S)(img), x)


# ------------------------------------------------------------------------------------------
# VTAB
# ------------------------------------------------------------------------------------------

def test_vtab_reads_lists(vtab_root):
    b = build_datasets(cfg(format="vtab", name="dtd", root=str(vtab_root)), image_size=S)
    assert b.num_classes == 47 and b.class_names[:3] == ["0", "1", "2"] and len(b.class_names) == 47
    assert (len(b.train), len(b.val), len(b.test)) == (6, 3, 4)
    assert b.train.labels == [0, 1, 2, 0, 1, 2]
    assert not (b.train.augmented or b.val.augmented or b.test.augmented)
    assert b.info["splits"] == {"train": "train800", "val": "val200", "test": "test"}
    assert b.info["resize"].startswith("tf_bilinear 32x32 (no antialias")
    assert b.train[0][0].shape == (3, S, S)
    # the task folder itself as root, task name taken from it; final run uses train800val200
    f = build_datasets(cfg(format="vtab", root=str(vtab_root / "dtd"), final=True), image_size=S)
    assert f.info["name"] == "dtd" and len(f.train) == 9 and f.info["splits"]["train"] == "train800val200"
    assert any("val (val200.txt) is inside train" in n for n in f.info["notes"])


def test_vtab_errors_name_file_and_line(vtab_root):
    with pytest.raises(DataError, match=r"unknown VTAB task data.name='dtdd'; valid tasks: cifar, caltech101"):
        build_datasets(cfg(format="vtab", name="dtdd", root=str(vtab_root)), image_size=S)
    lst = vtab_root / "dtd" / "val200.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:1] + ["images/val200/000001.png 47"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"val200\.txt line 2: label 47 outside \[0, 47\)"):
        build_datasets(cfg(format="vtab", name="dtd", root=str(vtab_root)), image_size=S)
    lst.write_text("\n".join(lines[:2] + ["images/val200/000002.png seven"]) + "\n")
    with pytest.raises(DataError, match=r"val200\.txt line 3: label 'seven' is not an integer"):
        build_datasets(cfg(format="vtab", name="dtd", root=str(vtab_root)), image_size=S)
    lst.write_text("")
    with pytest.raises(DataError, match=r"the val split \(val200\.txt\) of .* lists no images"):
        build_datasets(cfg(format="vtab", name="dtd", root=str(vtab_root)), image_size=S)
    (vtab_root / "dtd" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"missing split file .*dtd/test\.txt"):
        build_datasets(cfg(format="vtab", name="dtd", root=str(vtab_root)), image_size=S)
    with pytest.raises(DataError, match=r"missing split file .*eurosat/train800\.txt"):
        build_datasets(cfg(format="vtab", name="eurosat", root=str(vtab_root)), image_size=S)


def _hand_tf1_bilinear(img, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), written out per pixel."""
    in_h, in_w = img.shape[:2]
    out = np.zeros((out_h, out_w, img.shape[2]))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, y1, fy = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1), y - np.floor(y)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, x1, fx = int(np.floor(x)), min(int(np.ceil(x)), in_w - 1), x - np.floor(x)
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_tf_bilinear_kernel():
    # 2 -> 4 pixels: TF1 samples 0, 0.5, 1, 1.5 (edge repeats); TF2/torch sample -0.25 .. 1.25
    row = np.array([[[0], [100]]], dtype=np.uint8)
    assert tf_resize_bilinear(row, (1, 4))[0, :, 0].tolist() == [0, 50, 100, 100]
    assert tf_resize_bilinear(row, (1, 4), half_pixel_centers=True)[0, :, 0].tolist() == [0, 25, 75, 100]
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    for size in [(5, 4), (16, 20), (3, 13)]:
        ours = tf_resize_bilinear(img, size)
        assert np.allclose(ours, _hand_tf1_bilinear(img.astype(np.float64), *size), atol=1e-3)
        torch_half = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=size,
                                   mode="bilinear", align_corners=False, antialias=False)
        assert np.allclose(tf_resize_bilinear(img, size, True), torch_half[0].permute(1, 2, 0).numpy(), atol=1e-3)


def test_vtab_resize_equals_hand_computed(tmp_path):
    folder = tmp_path / "svhn"
    arr = np.random.default_rng(1).integers(0, 256, (3, 4, 3)).astype(np.uint8)
    os.makedirs(folder / "images")
    Image.fromarray(arr).save(folder / "images" / "a.png")
    for f in ("train800", "val200", "train800val200", "test"):
        (folder / f"{f}.txt").write_text("images/a.png 3\n")
    b = build_datasets(cfg(format="vtab", root=str(folder)), image_size=7)  # upsample 3x4 -> 7x7
    expected = np.rint(_hand_tf1_bilinear(arr.astype(np.float64), 7, 7)).astype(np.uint8)
    x, y = b.test[0]
    assert y == 3
    assert torch.allclose(x, normalise(expected), atol=1e-6)
    big = np.random.default_rng(2).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(big).save(folder / "images" / "a.png")
    b = build_datasets(cfg(format="vtab", root=str(folder)), image_size=7)  # downsample, no antialias
    expected = np.rint(_hand_tf1_bilinear(big.astype(np.float64), 7, 7)).astype(np.uint8)
    assert torch.allclose(b.val[0][0], normalise(expected), atol=1e-6)
    # the antialias option is PIL bilinear (antialiased) resize
    a = build_datasets(cfg(format="vtab", root=str(folder), vtab_resize="antialias"), image_size=7)
    pil = np.asarray(Image.fromarray(big).resize((7, 7), Image.BILINEAR))
    assert torch.allclose(a.val[0][0], normalise(pil), atol=1e-6)
    assert a.info["resize"].startswith("antialias 7x7")
    assert torch.equal(eval_transform(a.info, 7)(Image.fromarray(big)), a.val[0][0])
    assert torch.equal(eval_transform(b.info, 7)(Image.fromarray(big)), b.val[0][0])


# ------------------------------------------------------------------------------------------
# image folder and CSV
# ------------------------------------------------------------------------------------------

def test_stratified_carve_is_seeded_stratified_disjoint():
    labels = [0] * 20 + [1] * 5 + [2] * 2 + [3]
    kept, carved = stratified_carve(labels, {"val": 0.1, "test": 0.1}, seed=3)
    val, test = carved["val"], carved["test"]
    assert not (set(kept) & set(val)) and not (set(kept) & set(test)) and not (set(val) & set(test))
    assert sorted(kept + val + test) == list(range(len(labels)))
    assert {labels[i] for i in val} == {0, 1, 2}  # every class that has >= 2 images
    assert {labels[i] for i in kept} == {0, 1, 2, 3}
    assert sum(labels[i] == 0 for i in val) == 2
    assert stratified_carve(labels, {"val": 0.1, "test": 0.1}, seed=3) == (kept, carved)
    assert stratified_carve(labels, {"val": 0.1, "test": 0.1}, seed=4) != (kept, carved)


def test_folder_whole_tree_is_carved(tmp_path):
    root = make_folder(tmp_path / "pets")
    os.makedirs(root / ".gapt_cache")  # hidden folders are never classes
    b = build_datasets(cfg(format="folder", root=str(root), val_fraction=0.2), image_size=S, seed=1)
    assert b.class_names == ["cat", "dog", "eel"] and b.num_classes == 3
    assert (len(b.train), len(b.val), len(b.test)) == (18, 6, 6)
    assert set(b.val.labels) == {0, 1, 2} and set(b.test.labels) == {0, 1, 2}
    assert not (set(b.train.paths) & set(b.val.paths)) and not (set(b.val.paths) & set(b.test.paths))
    for p, y in zip(b.train.paths, b.train.labels):
        assert os.path.basename(os.path.dirname(p)) == b.class_names[y]
    assert b.train.augmented and not b.val.augmented
    assert "carved from" in b.info["splits"]["val"]
    again = build_datasets(cfg(format="folder", root=str(root), val_fraction=0.2), image_size=S, seed=1)
    assert again.val.paths == b.val.paths
    other = build_datasets(cfg(format="folder", root=str(root), val_fraction=0.2), image_size=S, seed=2)
    assert other.val.paths != b.val.paths
    final = build_datasets(cfg(format="folder", root=str(root), val_fraction=0.2, final=True), image_size=S, seed=1)
    assert len(final.train) == 24 and set(final.val.paths) <= set(final.train.paths)


def test_folder_with_split_subfolders(tmp_path):
    make_folder(tmp_path / "ds" / "train", per_class=4)
    make_folder(tmp_path / "ds" / "val", per_class=1)
    b = build_datasets(cfg(format="folder", root=str(tmp_path / "ds")), image_size=S)
    assert (len(b.train), len(b.val), len(b.test)) == (9, 3, 3)  # test carved from train
    assert b.info["splits"]["val"] == "val/"
    assert all("/val/" in p for p in b.val.paths)
    with pytest.raises(DataError, match=r"image folder not found: .*ds/holdout"):
        build_datasets(cfg(format="folder", root=str(tmp_path / "ds"), test_split="holdout"), image_size=S)
    with pytest.raises(DataError, match=r"image folder not found: .*missing"):
        build_datasets(cfg(format="folder", root=str(tmp_path / "missing")), image_size=S)
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match=r"the train split .* lists no images"):
        build_datasets(cfg(format="folder", root=str(tmp_path / "empty")), image_size=S)


def test_csv_with_names_ints_header_and_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("ant", "bee"), per_class=6, ext="png")
    rows = [f"{c}/{i:03d}.png,{c}" for c in ("ant", "bee") for i in range(6)]
    (tmp_path / "train.csv").write_text("path,label\n" + "\n".join(rows[:4] + rows[6:10]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows[4:6] + rows[10:]) + "\n")
    b = build_datasets(cfg(format="csv", root=str(root), csv_train=str(tmp_path / "train.csv"),
                           csv_test=str(tmp_path / "test.csv")), image_size=S)
    assert b.class_names == ["ant", "bee"]
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 4)
    assert set(b.val.labels) == {0, 1}
    assert all(b.class_names[y] in p for p, y in zip(b.test.paths, b.test.labels))
    # integer labels, no header, csv named relative to root
    rows = [f"{c}/00{i}.png,{y}\n" for c, y in (("ant", 0), ("bee", 4)) for i in range(3)]
    (root / "ints.csv").write_text("".join(rows))
    b = build_datasets(cfg(format="csv", root=str(root), csv_train="ints.csv"), image_size=S)
    assert b.num_classes == 5 and sorted(set(b.train.labels + b.val.labels + b.test.labels)) == [0, 4]
    (root / "bad.csv").write_text("ant/000.png,0\nant/001.png,-1\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2: label -1 outside \[0, num_classes\)"):
        build_datasets(cfg(format="csv", root=str(root), csv_train="bad.csv"), image_size=S)
    (root / "bad.csv").write_text("ant/000.png,0\n\nant/001.png\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: expected 'path,label'"):
        build_datasets(cfg(format="csv", root=str(root), csv_train="bad.csv"), image_size=S)
    with pytest.raises(DataError, match=r"missing split file .*nothere\.csv"):
        build_datasets(cfg(format="csv", root=str(root), csv_train="nothere.csv"), image_size=S)
    with pytest.raises(DataError, match=r"needs data.csv_train"):
        build_datasets(cfg(format="csv", root=str(root)), image_size=S)


# ------------------------------------------------------------------------------------------
# bad images
# ------------------------------------------------------------------------------------------

def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_bad_images_raise_or_are_skipped(vtab_root, cache, caplog):
    folder = vtab_root / "dtd"
    (folder / "images" / "test" / "000002.png").write_bytes(b"not an image")
    (folder / "images" / "test" / "000003.png").unlink()
    c = dict(format="vtab", name="dtd", root=str(vtab_root), cache=cache)
    with pytest.raises(DataError, match=r"cannot read image .*test/000002\.png \(listed at .*test\.txt line 3\).*"
                                        r"and 1 more bad image in the test split.*skip_bad_images"):
        build_datasets(DataConfig(**c), image_size=S)
    with caplog.at_level(logging.WARNING, logger="gapt.data"):
        b = build_datasets(DataConfig(**c, skip_bad_images=True), image_size=S)
    assert b.info["skipped_images"] == 2 and b.info["skipped"] == {"test": 2} and len(b.test) == 2
    assert b.info["num_test"] == 2
    assert any("skipped 2" in r.message for r in caplog.records)
    assert [os.path.basename(p) for p in b.test.paths] == ["000000.png", "000001.png"]
    assert b.test.labels == [0, 1] and b.test[1][1] == 1


def test_truncated_jpeg_in_augmented_train_is_caught(fgvc_root):
    train = json.loads((fgvc_root / "train.json").read_text())
    victim = str(fgvc_root / list(train)[4])
    _truncate(victim)
    with pytest.raises(DataError, match=rf"cannot read image {victim} \(listed at .*train\.json line 6\)"):
        build_datasets(cfg(format="fgvc", root=str(fgvc_root)), image_size=S)
    b = build_datasets(cfg(format="fgvc", root=str(fgvc_root), skip_bad_images=True), image_size=S)
    assert b.info["skipped_images"] == 1 and len(b.train) == 8 and victim not in b.train.paths


def test_all_images_bad_is_an_empty_split(fgvc_root):
    for rel in json.loads((fgvc_root / "val.json").read_text()):
        (fgvc_root / rel).write_bytes(b"")
    with pytest.raises(DataError, match=r"the val split \(val\.json\) .* has no readable images"):
        build_datasets(cfg(format="fgvc", root=str(fgvc_root), skip_bad_images=True), image_size=S)


def test_config_errors():
    with pytest.raises(DataError, match=r"unknown data.format 'lmdb'; valid formats: fgvc, vtab"):
        build_datasets(DataConfig(format="lmdb"), image_size=S)
    with pytest.raises(DataError, match=r"'ade20k' is a segmentation format"):
        build_datasets(DataConfig(format="ade20k"), image_size=S)
    with pytest.raises(DataError, match=r"data.root is empty"):
        build_datasets(DataConfig(format="vtab", name="dtd"), image_size=S)
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------------
# caches
# ------------------------------------------------------------------------------------------

def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and i == j for (x, i), (y, j) in zip(a, b))


def test_cached_items_equal_uncached(vtab_root, fgvc_root, tmp_path):
    c = dict(format="vtab", name="dtd", root=str(vtab_root))
    plain = build_datasets(DataConfig(**c, cache="none"), image_size=S)
    mem = build_datasets(DataConfig(**c, cache="memory"), image_size=S)
    disk = build_datasets(DataConfig(**c, cache="disk", cache_dir=str(tmp_path / "c")), image_size=S)
    assert plain.test.cache is None and mem.test.cache.mode == "memory" and disk.test.cache.mode == "disk"
    for split in ("train", "val", "test"):
        ref = _items(getattr(plain, split))
        assert _same(ref, _items(getattr(mem, split)))
        assert _same(ref, _items(getattr(disk, split)))
    # FGVC: eval splits cached, the augmented train split not by default (data.cache_augmented)
    f = build_datasets(cfg(format="fgvc", root=str(fgvc_root), cache="memory"), image_size=S)
    g = build_datasets(cfg(format="fgvc", root=str(fgvc_root), cache="none"), image_size=S)
    assert f.train.cache is None and f.val.cache is not None
    assert _same(_items(f.test), _items(g.test))
    # disk mode remembers that the augmented train split's images were checked
    build_datasets(cfg(format="fgvc", root=str(fgvc_root), cache="disk"), image_size=S)
    assert len(list((fgvc_root / ".gapt_cache").glob("*train*.checked.json"))) == 1
    assert len(list((fgvc_root / ".gapt_cache").glob("*.npy"))) == 2


@pytest.fixture
def fgvc_ragged_root(tmp_path):
    """FGVC layout with landscape, portrait and square images of different sizes."""
    root = tmp_path / "ragged"
    sizes = [(40, 30), (30, 50), (64, 36), (36, 36), (100, 41), (37, 90)]
    splits = {"train": {}, "val": {}, "test": {}}
    for n, size in enumerate(sizes * 2):
        rel = f"c{n % 3}/img_{n:03d}.jpg"
        write_image(str(root / rel), seed=n, size=size)
        splits["train"][rel] = n % 3
    for split in ("val", "test"):
        splits[split] = dict(list(splits["train"].items())[:3])
    for split, d in splits.items():
        (root / f"{split}.json").write_text(json.dumps(d))
    return root


def _epoch(ds, seed):
    torch.manual_seed(seed)  # the random crop and flip draw from torch's generator
    return _items(ds)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_augmented_cache_gives_the_same_epochs(fgvc_ragged_root, tmp_path, mode):
    """data.cache_augmented=true: the resized images are cached, the random crop and flip are not;
    every epoch equals decoding the files (same pixels, same draws)."""
    c = dict(format="fgvc", root=str(fgvc_ragged_root), cache_dir=str(tmp_path / "c"))
    plain = build_datasets(cfg(**c, cache=mode), image_size=S)
    cached = build_datasets(cfg(**c, cache=mode, cache_augmented=True), image_size=S)
    assert plain.train.cache is None and cached.train.cache.mode == mode and cached.train.augmented
    assert cached.info["cache_augmented"] and not plain.info["cache_augmented"]
    shapes = {tuple(cached.train.cache[i].shape) for i in range(len(cached.train))}
    assert (36, 48, 3) in shapes and (60, 36, 3) in shapes and (36, 36, 3) in shapes  # shorter side 36
    for seed in (0, 1):
        a, b = _epoch(plain.train, seed), _epoch(cached.train, seed)
        assert _same(a, b)
    assert not _same(_epoch(cached.train, 0), _epoch(cached.train, 1))  # still random per epoch
    w = pickle.loads(pickle.dumps(cached.train))  # what a DataLoader worker gets
    assert (w.cache._data is None) == (mode == "disk")  # a memmap is reopened, never pickled
    assert _same(_epoch(w, 2), _epoch(plain.train, 2))
    if mode == "disk":
        again = build_datasets(cfg(**c, cache=mode, cache_augmented=True), image_size=S)
        assert again.train.cache.path == cached.train.cache.path
        assert _same(_epoch(again.train, 3), _epoch(plain.train, 3))


def test_augmented_cache_bad_images(fgvc_ragged_root, tmp_path):
    bad = fgvc_ragged_root / "c1" / "img_001.jpg"
    bad.write_bytes(b"not a jpeg")
    c = dict(format="fgvc", root=str(fgvc_ragged_root), cache="memory", cache_augmented=True)
    with pytest.raises(DataError, match=r"cannot read image .*img_001\.jpg \(listed at .*train\.json"):
        build_datasets(cfg(**c), image_size=S)
    b = build_datasets(cfg(**c, skip_bad_images=True), image_size=S)
    assert len(b.train) == 11 and all(x.shape == (3, S, S) for x, _ in _items(b.train))


def test_eval_transform_from_minimal_info():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert eval_transform({"format": "fgvc"}, S).kind == "center_crop"
    assert eval_transform({"format": "vtab", "resize": "tf_bilinear 32x32"}, S).kind == "tf_bilinear"
    assert eval_transform({"format": "vtab", "resize": "antialias 32x32"}, S).kind == "antialias"
    assert eval_transform({"format": "shapes"}, S)(img).shape == (3, S, S)


def test_disk_cache_is_reused_and_invalidated(vtab_root, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    c = DataConfig(format="vtab", name="dtd", root=str(vtab_root), cache="disk", cache_dir=str(cache_dir))
    first = build_datasets(c, image_size=S)
    npy = sorted(p.name for p in cache_dir.glob("*.npy"))
    assert len(npy) == 3 and not list(cache_dir.glob("*.tmp*"))
    with caplog.at_level(logging.INFO, logger="gapt.data"):
        second = build_datasets(c, image_size=S)
    assert sum("using the disk cache of" in r.message for r in caplog.records) == 3
    assert second.test.cache.path == first.test.cache.path
    # rewrite one test image: new content, new size/mtime -> a new key, never the stale rows
    victim = vtab_root / "dtd" / "images" / "test" / "000001.png"
    write_image(str(victim), seed=999, size=(44, 31))
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    third = build_datasets(c, image_size=S)
    assert third.test.cache.path != first.test.cache.path
    assert third.train.cache.path == first.train.cache.path
    fresh = build_datasets(DataConfig(format="vtab", name="dtd", root=str(vtab_root), cache="none"), image_size=S)
    assert _same(_items(third.test), _items(fresh.test))
    assert not torch.equal(third.test[1][0], first.test[1][0])
    # a different image size is a different cache too
    other = build_datasets(c, image_size=16)
    assert other.test[0][0].shape == (3, 16, 16) and other.test.cache.path != third.test.cache.path


def test_default_disk_cache_location_and_workers(vtab_root):
    c = DataConfig(format="vtab", name="dtd", root=str(vtab_root), cache="disk")
    b = build_datasets(c, image_size=S)
    assert b.test.cache.path.startswith(str(vtab_root / "dtd" / ".gapt_cache"))
    clone = pickle.loads(pickle.dumps(b.test))  # what a spawned DataLoader worker receives
    assert clone.cache._data is None and _same(_items(clone), _items(b.test))
    loader = torch.utils.data.DataLoader(b.test, batch_size=2, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, torch.stack([x for x, _ in _items(b.test)]))


def test_disk_cache_remembers_bad_images(vtab_root, tmp_path):
    (vtab_root / "dtd" / "images" / "val200" / "000000.png").write_bytes(b"junk")
    c = dict(format="vtab", name="dtd", root=str(vtab_root), cache="disk", cache_dir=str(tmp_path / "c"))
    b = build_datasets(DataConfig(**c, skip_bad_images=True), image_size=S)
    assert b.info["skipped_images"] == 1 and len(b.val) == 2
    with pytest.raises(DataError, match=r"cannot read image .*val200/000000\.png"):  # read from the cache meta
        build_datasets(DataConfig(**c), image_size=S)


# ------------------------------------------------------------------------------------------
# generated datasets
# ------------------------------------------------------------------------------------------

def test_shapes_dispatch():
    pytest.importorskip("gapt.data.synthetic")
    b = build_datasets(DataConfig(format="shapes", name="count", num_samples=12), image_size=S, seed=0)
    assert b.num_classes == 6 and b.train[0][0].shape == (3, S, S) and not b.train.augmented
    with pytest.raises(DataError, match="count"):
        build_datasets(DataConfig(format="shapes", name="nope"), image_size=S)
    tf = eval_transform(b.info, S)
    assert tf(Image.new("RGB", (40, 30))).shape == (3, S, S)
