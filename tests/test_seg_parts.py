"""Model-independent segmentation parts: data, transforms, SETR-PUP heads, loss, metrics,
inference and colour maps. Tiny fixtures written to tmp_path; a stand-in encoder with the
prompted ViT's segmentation interface."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import Block

from gapt.seg import (ADE20K_CLASSES, PALETTE, SETRPUPHead, SegDataError, SegDataset, SegEvalPipeline,
                      SegMetrics, SegmentationModel, SegTrainPipeline, build_ade20k, build_folder_seg,
                      build_seg_datasets, confusion_matrix, multiscale_inference, reduce_confusion,
                      save_mask_png, save_overlay_png, seg_loss, slide_inference, slide_windows,
                      tokens_to_map, whole_inference)
from gapt.seg.inference import MS_RATIOS, scaled_size
from gapt.seg.transforms import (PhotoMetricDistortion, crop_box, hsv_to_rgb, max_class_ratio, random_crop,
                                 rescale_size, rgb_to_hsv)

H, W = 48, 40


# -- fixtures -----------------------------------------------------------------------------------
def _write_pair(img_dir, mask_dir, stem, mask, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(img_dir / f"{stem}.jpg")
    Image.fromarray(mask.astype(np.uint8)).save(mask_dir / f"{stem}.png")


def _raw_mask(seed, max_value):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, max_value + 1, (H, W)).astype(np.uint8)
    m[:4, :4] = 0
    return m


@pytest.fixture
def ade_root(tmp_path):
    """ADE20K layout, 4 training and 2 validation pairs, raw values 0..150 (0 = ignore)."""
    root = tmp_path / "ade"
    for split, n in (("training", 4), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            mask = _raw_mask(i, 150)
            if i == 0:
                mask[0, 0], mask[0, 1], mask[0, 2], mask[0, 3] = 0, 1, 150, 255
            _write_pair(root / "images" / split, root / "annotations" / split, f"ADE_{split}_{i:04d}", mask, i)
    return root


@pytest.fixture
def folder_root(tmp_path):
    """Folder layout for a user's data: 3 classes, labels as they are, 255 ignored."""
    root = tmp_path / "mine"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            mask = _raw_mask(10 + i, 2)
            mask[-1, -1] = 255
            _write_pair(root / "images" / split, root / "masks" / split, f"img{i}", mask, 10 + i)
    (root / "classes.txt").write_text("sky\nroad\n\ncar\n")
    return root


# -- data ---------------------------------------------------------------------------------------
def test_ade20k_reader_reduces_zero_label(ade_root):
    ds = build_ade20k(ade_root, "training")
    assert len(ds) == 4 and ds.num_classes == 150 and ds.class_names == list(ADE20K_CLASSES)
    raw = np.array(Image.open(ds.samples[0][1]))
    item = ds[0]  # default pipeline: original size, normalised
    label = item["label"].numpy()
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert label.shape == (H, W) and item["label"].dtype == torch.int64
    expected = raw.astype(np.int64) - 1
    expected[(raw == 0) | (raw == 255)] = 255
    np.testing.assert_array_equal(label, expected)
    assert list(label[0, :4]) == [255, 0, 149, 255]
    assert build_ade20k(ade_root, "val").name == "ADE20K validation"


def test_folder_reader_keeps_labels(folder_root):
    train, val = build_seg_datasets("seg_folder", folder_root, SegTrainPipeline(crop_size=16, scale=(64, 16)),
                                    SegEvalPipeline(scale=None))
    assert train.class_names == ["sky", "road", "car"] and train.num_classes == 3 and len(val) == 2
    raw = np.array(Image.open(val.samples[1][1]))
    np.testing.assert_array_equal(val[1]["label"].numpy(), raw)
    assert train[0]["image"].shape == (3, 16, 16)
    # the same item draws the same augmentation; a new epoch draws another
    a, b = train[0], train[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    train.set_epoch(1)
    assert not torch.equal(train[0]["image"], a["image"])
    # reduce_zero_label is configurable for user data too
    ds = build_folder_seg(folder_root / "images" / "val", folder_root / "masks" / "val",
                          folder_root / "classes.txt", reduce_zero_label=True)
    lab = ds[1]["label"].numpy()
    assert set(np.unique(lab)) <= {0, 1, 255} and (lab[raw == 0] == 255).all() and (lab[raw == 2] == 1).all()


def test_missing_folder_named(tmp_path, ade_root, folder_root):
    with pytest.raises(SegDataError, match="ADE20K root folder not found: .*nowhere"):
        build_ade20k(tmp_path / "nowhere", "training")
    (ade_root / "annotations" / "validation").rename(ade_root / "annotations" / "val_moved")
    with pytest.raises(SegDataError, match=r"mask folder not found: .*annotations[/\\]validation"):
        build_ade20k(ade_root, "validation")
    with pytest.raises(SegDataError, match=r"image folder not found: .*images[/\\]test"):
        build_seg_datasets("seg_folder", folder_root, val_split="test")
    with pytest.raises(SegDataError, match="split must be one of"):
        build_ade20k(ade_root, "testing")
    with pytest.raises(SegDataError, match="unknown segmentation data format 'coco'"):
        build_seg_datasets("coco", folder_root)
    with pytest.raises(SegDataError, match="class-name file not found: .*nope.txt"):
        build_seg_datasets("seg_folder", folder_root, classes_file="nope.txt")
    (folder_root / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(SegDataError, match="lists 'a' twice"):
        build_seg_datasets("seg_folder", folder_root, classes_file="dup.txt")


def test_image_without_annotation(ade_root):
    (ade_root / "annotations" / "training" / "ADE_training_0002.png").unlink()
    with pytest.raises(SegDataError, match=r"image .*ADE_training_0002\.jpg has no annotation"):
        build_ade20k(ade_root, "training")


def test_bad_mask_mode_and_unreadable(ade_root):
    bad = ade_root / "annotations" / "training" / "ADE_training_0001.png"
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(bad)
    with pytest.raises(SegDataError, match=r"mask .*ADE_training_0001\.png is not single-channel \(PIL mode RGB\)"):
        build_ade20k(ade_root, "training")
    bad.write_bytes(b"this is not a png")
    with pytest.raises(SegDataError, match=r"mask .*ADE_training_0001\.png cannot be read"):
        build_ade20k(ade_root, "training", check_labels=False)
    Image.fromarray(np.zeros((H + 1, W), dtype=np.uint8)).save(bad)
    with pytest.raises(SegDataError, match=r"mask .*ADE_training_0001\.png is 40x49 .* its image .* is 40x48"):
        build_ade20k(ade_root, "training", check_labels=False)


def test_label_out_of_range(ade_root, folder_root):
    bad = ade_root / "annotations" / "training" / "ADE_training_0003.png"
    m = _raw_mask(3, 150)
    m[5, 5] = 151
    Image.fromarray(m).save(bad)
    with pytest.raises(SegDataError, match=r"mask .*ADE_training_0003\.png holds label value 151, out of range "
                                           r"for num_classes=150"):
        build_ade20k(ade_root, "training")
    # without the construction scan the same error comes when the item is loaded
    ds = build_ade20k(ade_root, "training", check_labels=False)
    with pytest.raises(SegDataError, match="holds label value 151"):
        ds[3]
    m = np.zeros((H, W), dtype=np.uint8)
    m[1, 1] = 3
    Image.fromarray(m).save(folder_root / "masks" / "train" / "img0.png")
    with pytest.raises(SegDataError, match=r"img0\.png holds label value 3, out of range for num_classes=3"):
        build_seg_datasets("seg_folder", folder_root)


def test_dataset_arguments_checked(folder_root):
    with pytest.raises(SegDataError, match="num_classes must lie in 1..255"):
        SegDataset(folder_root / "images" / "val", folder_root / "masks" / "val", num_classes=300)
    with pytest.raises(SegDataError, match="2 class names given for num_classes=3"):
        SegDataset(folder_root / "images" / "val", folder_root / "masks" / "val", 3, class_names=["a", "b"])


# -- transforms --------------------------------------------------------------------------------
def test_rescale_size_keep_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(256, 341, (2048, 512)) == (512, 682)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds
    assert rescale_size(H, W, (128, 32)) == (38, 32)
    assert rescale_size(H, W, (32, 128)) == rescale_size(H, W, (128, 32))


def test_train_pipeline_shapes_and_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (H, W)).astype(np.uint8)
    pipe = SegTrainPipeline(crop_size=32, scale=(128, 32))
    for seed in range(8):
        img, lab = pipe(image, label, np.random.default_rng(seed))
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert lab.shape == (32, 32) and lab.dtype == torch.int64
        assert set(lab.unique().tolist()) <= set(range(5)) | {255}
    # ratio 0.5: the image is resized to 19x16 and padded: label 255, image 0 (after normalising)
    small = SegTrainPipeline(crop_size=32, scale=(128, 32), ratio_range=(0.5, 0.5), photometric=False)
    img, lab = small(image, label, np.random.default_rng(1))
    assert (lab[19:] == 255).all() and (lab[:, 16:] == 255).all() and (lab[:19, :16] != 255).all()
    assert (img[:, 19:] == 0).all() and (img[:, :, 16:] == 0).all()
    # crop rectangle; a flip mirrors image and label together
    no_flip = SegTrainPipeline(crop_size=(24, 16), scale=None, cat_max_ratio=1.0, flip_prob=0.0, photometric=False)
    flip = SegTrainPipeline(crop_size=(24, 16), scale=None, cat_max_ratio=1.0, flip_prob=1.0, photometric=False)
    a_img, a_lab = no_flip(image, label, np.random.default_rng(3))
    b_img, b_lab = flip(image, label, np.random.default_rng(3))
    assert a_img.shape == (3, 24, 16)
    assert torch.equal(a_lab.flip(-1), b_lab) and torch.allclose(a_img.flip(-1), b_img)


def test_eval_pipeline_resizes_image_keeps_label():
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    label = np.ones((H, W), dtype=np.uint8)
    img, lab = SegEvalPipeline(scale=(128, 32))(image, label)
    assert img.shape == (3, 38, 32) and lab.shape == (H, W)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([(100 - 123.675) / 58.395, (100 - 116.28) / 57.12,
                                                           (100 - 103.53) / 57.375]))


def _replay_crop(label, crop, seed, ratio):
    """The window MMSegmentation's RandomCrop would take with the same draws."""
    rng = np.random.default_rng(seed)
    boxes = [crop_box(*label.shape, crop, rng) for _ in range(11)]
    for box in boxes[:10]:
        y1, y2, x1, x2 = box
        n, share = max_class_ratio(label[y1:y2, x1:x2])
        if n > 1 and share < ratio:
            return box, True
    return boxes[10], False


def test_random_crop_honours_cat_max_ratio():
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:, :32] = 1                 # left half class 1, right half class 0
    label[:8] = 255                   # ignored rows do not count
    image = np.arange(64 * 64 * 3, dtype=np.int64).reshape(64, 64, 3).astype(np.uint8)
    honoured = plain_bad = 0
    for seed in range(60):
        box, found = _replay_crop(label, (32, 32), seed, 0.75)
        _, lab = random_crop(image, label, (32, 32), np.random.default_rng(seed), cat_max_ratio=0.75)
        y1, y2, x1, x2 = box
        np.testing.assert_array_equal(lab, label[y1:y2, x1:x2])
        n, share = max_class_ratio(lab)
        if found:
            assert n > 1 and share < 0.75
            honoured += 1
        _, lab = random_crop(image, label, (32, 32), np.random.default_rng(seed), cat_max_ratio=1.0)
        n, share = max_class_ratio(lab)
        plain_bad += not (n > 1 and share < 0.75)
    assert honoured >= 55 and plain_bad >= 20
    # a single-class label cannot satisfy the ratio: the last draw is kept, no endless retry
    _, lab = random_crop(image, np.zeros((64, 64), np.uint8), (32, 32), np.random.default_rng(0), 0.75)
    assert lab.shape == (32, 32)


def test_photometric_distortion():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    hsv = rgb_to_hsv(img.astype(np.float32))
    assert hsv[..., 0].min() >= 0 and hsv[..., 0].max() < 360 and hsv[..., 1].max() <= 1
    np.testing.assert_allclose(hsv_to_rgb(hsv), img.astype(np.float32), atol=1e-3)
    pmd = PhotoMetricDistortion()
    outs = [pmd(img, np.random.default_rng(s)) for s in range(6)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)
    np.testing.assert_array_equal(pmd(img, np.random.default_rng(4)), outs[4])


# -- head, model, loss ---------------------------------------------------------------------------
class StandInEncoder(nn.Module):
    """The prompted ViT's segmentation interface: patch embedding, CLS + prompts, timm blocks."""

    def __init__(self, dim=16, depth=9, patch=8, num_prompts=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.prompts = nn.Parameter(torch.randn(1, num_prompts, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, num_heads=2) for _ in range(depth)])
        for p in list(self.patch_embed.parameters()) + list(self.blocks.parameters()) + [self.cls_token]:
            p.requires_grad_(False)
        self.embed_dim, self.patch_size, self.depth = dim, patch, depth
        self.num_prefix_tokens = 1 + num_prompts

    def forward_tokens(self, images, collect=()):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.prompts.expand(b, -1, -1), x], dim=1)
        out = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i + 1 in collect:
                out[i + 1] = x
        return x, out


@pytest.mark.parametrize("hw", [(2, 2), (4, 3), (1, 5)])
def test_setr_pup_head_shapes(hw):
    torch.manual_seed(0)
    x = torch.randn(2, 16, *hw)
    main = SETRPUPHead(16, 5, channels=8)
    aux = SETRPUPHead(16, 5, channels=8, num_convs=2, up_scale=4)
    assert main(x).shape == (2, 5, hw[0] * 16, hw[1] * 16)
    assert aux(x).shape == (2, 5, hw[0] * 16, hw[1] * 16)
    assert isinstance(main.norm, nn.LayerNorm) and main.norm.eps == 1e-6
    assert len(main.up_convs) == 4 and len(aux.up_convs) == 2
    assert isinstance(main.up_convs[0][1], nn.BatchNorm2d) and main.up_convs[0][0].bias is None


def test_tokens_to_map():
    b, prefix, h, w, d = 2, 4, 3, 5, 6
    tokens = torch.randn(b, prefix + h * w, d)
    fmap = tokens_to_map(tokens, prefix, (h, w))
    assert fmap.shape == (b, d, h, w)
    assert torch.equal(fmap[1, :, 2, 3], tokens[1, prefix + 2 * w + 3])
    with pytest.raises(ValueError, match="does not match 4 prefix tokens"):
        tokens_to_map(tokens, prefix, (h, w + 1))


# -- an independent transcription of MMSegmentation's ViT + SETR-PUP forward -----------------------
def mmseg_setr_up_head(head, fmap, up_scale):
    """mmseg SETRUPHead.forward from its source, on the tested head's parameters: LayerNorm over the
    channels of the (B, h*w, C) tokens, then per up-conv ConvModule (conv without bias -> BN -> ReLU)
    and Upsample(scale_factor, bilinear, align_corners=False), then cls_seg (1x1 conv; dropout 0).
    BatchNorm uses the batch's statistics in training, the running ones in evaluation."""
    n, c, h, w = fmap.shape
    x = F.layer_norm(fmap.flatten(2).transpose(1, 2), (c,), head.norm.weight, head.norm.bias, head.norm.eps)
    x = x.transpose(1, 2).reshape(n, c, h, w)
    for block in head.up_convs:
        conv, bn = block[0], block[1]
        x = F.conv2d(x, conv.weight, None, padding=conv.kernel_size[0] // 2)
        if bn.training:
            x = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        else:
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        x = F.interpolate(F.relu(x), scale_factor=up_scale, mode="bilinear", align_corners=False)
    return F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)


def mmseg_forward(model, img, crop_padded=False):
    """MMSegmentation's EncoderDecoder on its ViT, transcribed: PatchEmbed(padding='corner') pads the
    input with zeros at the bottom / right to a multiple of the patch (AdaptivePadding.get_pad_shape
    with kernel = stride = patch: pad = ceil(h / p) * p - h), the head runs on the padded grid, and its
    logits are resized (bilinear, align_corners=False) to the input's size (0.x encode_decode,
    1.x predict_by_feat / loss_by_feat). Returns {"main", "aux<b>"...} (aux only in training).
    ``crop_padded``: logits at the padded size cut back to the input instead (gapt's former rule, not
    MMSegmentation's)."""
    h, w = img.shape[-2:]
    p = model.encoder.patch_size
    pad_h, pad_w = math.ceil(h / p) * p - h, math.ceil(w / p) * p - w
    x = F.pad(img, [0, pad_w, 0, pad_h])
    grid = ((h + pad_h) // p, (w + pad_w) // p)
    tokens, inter = model.encoder.forward_tokens(x, collect=model.aux_blocks if model.training else ())
    prefix = model.encoder.num_prefix_tokens

    def decode(head, t, up):
        fmap = t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
        logits = mmseg_setr_up_head(head, fmap, up)
        if crop_padded:  # to the padded size (PUP's x16 is twice this patch-8 grid), then cut
            logits = F.interpolate(logits, size=(h + pad_h, w + pad_w), mode="bilinear", align_corners=False)
            return logits[..., :h, :w]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    out = {"main": decode(model.decode_head, tokens, 2)}
    for b in (model.aux_blocks if model.training else ()):
        out[f"aux{b}"] = decode(model.aux_heads[str(b)], inter[b], 4)
    return out


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (30, 20), (17, 41)])
def test_segmentation_model_outputs(size):
    """Values, train and eval mode, against the transcription above: sides that are not multiples of
    the patch (8) are padded, and the padded logits resized to the input, not cropped."""
    torch.manual_seed(0)
    model = SegmentationModel(StandInEncoder(), num_classes=5, aux_blocks=(5, 9), channels=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affines for the evaluation pass
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    images = torch.randn(2, 3, *size)
    model.train()
    out = model(images)
    with torch.no_grad():
        expected = mmseg_forward(model, images)
    assert set(out) == set(expected) == {"main", "aux5", "aux9"}
    for k in expected:
        assert out[k].shape == (2, 5, *size)
        torch.testing.assert_close(out[k], expected[k], rtol=1e-5, atol=1e-5)
    labels = torch.randint(0, 5, (2, *size))
    labels[:, :3] = 255
    seg_loss(out, labels).backward()
    assert model.encoder.prompts.grad is not None and model.encoder.prompts.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(images)
        reference = mmseg_forward(model, images)
    assert isinstance(logits, torch.Tensor) and set(reference) == {"main"}
    torch.testing.assert_close(logits, reference["main"], rtol=1e-5, atol=1e-5)
    if size[0] % 8 or size[1] % 8:  # the test can tell: cropping the padded logits is another answer
        with torch.no_grad():
            cropped = mmseg_forward(model, images, crop_padded=True)["main"]
        assert not torch.allclose(logits, cropped, atol=1e-3)


def test_segmentation_model_param_groups_and_checks():
    model = SegmentationModel(StandInEncoder(), num_classes=5, channels=8)
    enc, heads = model.param_groups(lr=0.001)
    assert enc["lr"] == 0.001 and heads["lr"] == pytest.approx(0.01)
    assert [id(p) for p in enc["params"]] == [id(model.encoder.prompts)]
    assert len(heads["params"]) == len(list(model.decode_head.parameters())) + len(list(model.aux_heads.parameters()))
    with pytest.raises(ValueError, match="auxiliary block 12 is outside"):
        SegmentationModel(StandInEncoder(), num_classes=5, aux_blocks=(5, 12))


def test_seg_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3, 3)
    labels = torch.full((1, 3, 3), 255)
    labels[0, 1, 2] = 2
    labels[0, 0, 1] = 0

    def nll(x, y, i, j):  # -log softmax(x[:, :, i, j])[y], written out
        z = x[0, :, i, j].double()
        return float(torch.logsumexp(z, 0) - z[y])
    main = nll(logits, 2, 1, 2) + nll(logits, 0, 0, 1)
    torch.testing.assert_close(seg_loss({"main": logits}, labels, avg_non_ignore=True).item(), main / 2, rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(seg_loss({"main": logits}, labels).item(), main / 9, rtol=1e-6, atol=0)  # / all pixels
    two = torch.tensor([2, 0])
    torch.testing.assert_close(seg_loss(logits, labels, avg_non_ignore=True),
                               F.cross_entropy(torch.stack([logits[0, :, 1, 2], logits[0, :, 0, 1]]), two))
    other = logits.clone()
    other[:, :, 0, 0] += 5.0  # an ignored pixel does not matter
    torch.testing.assert_close(seg_loss(other, labels), seg_loss(logits, labels))
    # auxiliary heads: 0.4 x their own loss each (SETR's loss_weight), added to the main loss
    aux5, aux9 = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    a5, a9 = nll(aux5, 2, 1, 2) + nll(aux5, 0, 0, 1), nll(aux9, 2, 1, 2) + nll(aux9, 0, 0, 1)
    got = seg_loss({"main": logits, "aux5": aux5, "aux9": aux9}, labels).item()
    assert got == pytest.approx((main + 0.4 * a5 + 0.4 * a9) / 9, rel=1e-6)
    got = seg_loss({"main": logits, "aux5": aux5}, labels, aux_weight=0.25, avg_non_ignore=True).item()
    assert got == pytest.approx((main + 0.25 * a5) / 2, rel=1e-6)
    assert seg_loss(logits, torch.full((1, 3, 3), 255)) == 0
    # logits smaller than the label are resized to it (bilinear, align_corners=False) first
    small = torch.randn(1, 4, 2, 2, requires_grad=True)
    up = F.interpolate(small.detach(), size=(3, 3), mode="bilinear", align_corners=False)
    assert seg_loss(small, labels).item() == pytest.approx((nll(up, 2, 1, 2) + nll(up, 0, 0, 1)) / 9, rel=1e-6)
    seg_loss(small, labels).backward()
    assert small.grad is not None


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_against_hand_computed_confusion():
    # 4 classes; class 3 never appears (NaN, excluded); class 2 is predicted but never labelled
    label = torch.tensor([[0, 0, 0, 1], [1, 1, 255, 255], [0, 1, 0, 1]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 3, 0], [0, 1, 2, 1]])
    cm = confusion_matrix(pred, label, num_classes=4)
    expected = torch.tensor([[3, 1, 1, 0],   # label 0: pred 0,0,1 | 0,2
                             [0, 4, 1, 0],   # label 1: pred 1 | 1,2 | 1,1
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]])
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)
    m = SegMetrics.from_confusion(cm, class_names=["a", "b", "c", "d"])
    iou = [3 / 5, 4 / 6, 0.0, math.nan]        # I / (label + pred - I)
    acc = [3 / 5, 4 / 5, math.nan, math.nan]   # I / label
    np.testing.assert_allclose(m.iou, np.array(iou) * 100)
    np.testing.assert_allclose(m.acc, np.array(acc) * 100)
    assert m.miou == pytest.approx((3 / 5 + 4 / 6 + 0.0) / 3 * 100)
    assert m.macc == pytest.approx((3 / 5 + 4 / 5) / 2 * 100)
    assert m.aacc == pytest.approx(7 / 10 * 100)
    d = m.as_dict(per_class=True)
    assert d["per_class"][3] == {"class": "d", "iou": None, "acc": None}
    # accumulation over batches equals one matrix over everything
    cm2 = confusion_matrix(pred[:2], label[:2], 4) + confusion_matrix(pred[2:], label[2:], 4)
    assert torch.equal(cm2, cm)
    assert reduce_confusion(cm) is cm  # no process group: unchanged
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        confusion_matrix(pred, torch.full_like(label, 7), 4)


def _reduce_worker(rank, path, q):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        q.put((rank, reduce_confusion(torch.full((2, 2), rank + 1, dtype=torch.int64)).tolist()))
    finally:
        dist.destroy_process_group()


def test_reduce_confusion_sums_across_processes(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reduce_worker, args=(r, tmp_path / "pg", q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: [[3, 3], [3, 3]], 1: [[3, 3], [3, 3]]}


# -- inference ----------------------------------------------------------------------------------
def test_slide_windows_follow_mmseg():
    assert slide_windows(100, 100, 64, 40) == [(0, 64, 0, 64), (0, 64, 36, 100), (36, 100, 0, 64),
                                               (36, 100, 36, 100)]
    assert slide_windows(20, 30, 64, 40) == [(0, 20, 0, 30)]       # smaller than the crop: one window
    wins = slide_windows(512, 683, 512, 341)
    assert wins == [(0, 512, 0, 512), (0, 512, 171, 683)]


def test_slide_equals_whole():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 37, 53)
    pointwise = nn.Conv2d(3, 6, 1)  # translation-equivariant per pixel
    whole = whole_inference(pointwise, image)
    torch.testing.assert_close(slide_inference(pointwise, image, 6, crop=64, stride=40), whole)
    torch.testing.assert_close(slide_inference(pointwise, image, 6, crop=(16, 24), stride=(7, 11)), whole,
                               rtol=1e-5, atol=1e-5)
    # a model with spatial context: equal when one window covers the image, not otherwise
    context = nn.Conv2d(3, 6, 5, padding=2)
    torch.testing.assert_close(slide_inference(context, image, 6, crop=(37, 53), stride=10),
                               whole_inference(context, image))
    assert not torch.allclose(slide_inference(context, image, 6, crop=16, stride=8), whole_inference(context, image))


def mmcv_keep_ratio_size(h, w, scale):
    """mmcv.rescale_size: the largest factor with long side <= max(scale), short side <= min(scale), rounded."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def mmseg_slide_inference(encode_decode, img, num_classes, crop, stride):
    """EncoderDecoder.slide_inference from its source: a window grid, each window's logits padded into
    place and summed, divided by how many windows covered each pixel."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    b, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((b, num_classes, h_img, w_img))
    count = img.new_zeros((b, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = encode_decode(img[:, :, y1:y2, x1:x2])
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return preds / count


def mmseg_aug_test(encode_decode, img, num_classes, ratios, img_scale, crop, stride, ori_shape):
    """MultiScaleFlipAug + aug_test: per ratio a keep-ratio resize into img_scale x ratio (here of the
    tensor), plain and flipped; slide inference, logits resized to the original shape, softmax, the
    flipped probabilities mirrored back; the mean of all of them."""
    h, w = img.shape[-2:]
    total, n = 0, 0
    for r in ratios:
        size = mmcv_keep_ratio_size(h, w, (int(img_scale[0] * r), int(img_scale[1] * r)))
        x = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = mmseg_slide_inference(encode_decode, x.flip(-1) if flip else x, num_classes, crop, stride)
            prob = F.interpolate(logits, size=ori_shape, mode="bilinear", align_corners=False).softmax(1)
            total, n = total + (prob.flip(-1) if flip else prob), n + 1
    return total / n


def test_multiscale_inference():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 24, 32)
    pointwise = nn.Conv2d(3, 4, 1)
    single = multiscale_inference(pointwise, image, 4, scales=(1.0,), flip=False, base_scale=None, mode="whole")
    torch.testing.assert_close(single, pointwise(image).softmax(1))
    flipped = multiscale_inference(pointwise, image, 4, scales=(1.0,), flip=True, base_scale=None, mode="whole")
    torch.testing.assert_close(flipped, single)  # a per-pixel model is flip-equivariant
    ms = multiscale_inference(pointwise, image, 4, base_scale=(128, 32), crop=16, stride=11, out_size=(48, 64))
    with torch.no_grad():
        ref = mmseg_aug_test(pointwise, image, 4, MS_RATIOS, (128, 32), (16, 16), (11, 11), (48, 64))
    torch.testing.assert_close(ms, ref, rtol=1e-5, atol=1e-6)
    assert scaled_size(24, 32, 0.5, (128, 32)) == (16, 21) and scaled_size(24, 32, 1.75, None) == (42, 56)

    # the segmentation model (patch 8): ratio 0.5 of (64, 32) makes the 40x56 image 16x22, a window that
    # is padded to 16x24 and whose logits are resized back to 16x22 (as MMSegmentation does)
    torch.manual_seed(1)
    model = SegmentationModel(StandInEncoder(), num_classes=5, channels=8).eval()
    image = torch.randn(1, 3, 40, 56)
    assert mmcv_keep_ratio_size(40, 56, (32, 16)) == (16, 22)
    with torch.no_grad():
        probs = multiscale_inference(model, image, 5, scales=(0.5, 0.75, 1.0), base_scale=(64, 32), crop=32,
                                     stride=21)
        ref = mmseg_aug_test(lambda x: mmseg_forward(model, x)["main"], image, 5, (0.5, 0.75, 1.0), (64, 32),
                             (32, 32), (21, 21), (40, 56))
        cropped = mmseg_aug_test(lambda x: mmseg_forward(model, x, crop_padded=True)["main"], image, 5,
                                 (0.5, 0.75, 1.0), (64, 32), (32, 32), (21, 21), (40, 56))
    assert probs.shape == (1, 5, 40, 56)
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs, cropped, atol=1e-4)  # the 0.5 scale's window tells the two apart
    with torch.no_grad():  # single scale: slide inference alone, against the transcription
        logits = slide_inference(model, image, 5, crop=32, stride=21)
        torch.testing.assert_close(logits, mmseg_slide_inference(lambda x: mmseg_forward(model, x)["main"], image, 5,
                                                                 (32, 32), (21, 21)), rtol=1e-5, atol=1e-5)


# -- palette ------------------------------------------------------------------------------------
def test_palette_and_pngs(tmp_path):
    assert len(ADE20K_CLASSES) == 150 and PALETTE.shape == (256, 3)
    assert len({tuple(c) for c in PALETTE[:150]}) == 150 and tuple(PALETTE[255]) == (0, 0, 0)
    mask = np.array([[0, 1, 2], [255, 149, 3]], dtype=np.uint8)
    path = save_mask_png(tmp_path / "out" / "mask.png", torch.from_numpy(mask))
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), mask)
        np.testing.assert_array_equal(np.array(im.convert("RGB")), PALETTE[mask])
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    with Image.open(save_overlay_png(tmp_path / "ov.png", image, mask, alpha=0.5)) as im:
        ov = np.array(im)
    assert ov.shape == (2, 3, 3)
    np.testing.assert_array_equal(ov[1, 0], image[1, 0])      # ignored pixel untouched
    np.testing.assert_allclose(ov[0, 0], (200 + PALETTE[0].astype(float)) / 2, atol=1)
    with Image.open(save_overlay_png(tmp_path / "ov0.png", image, mask, alpha=0.0)) as im:
        np.testing.assert_array_equal(np.array(im), image)
    with pytest.raises(ValueError, match="differs from image shape"):
        save_overlay_png(tmp_path / "bad.png", image, mask[:1])
