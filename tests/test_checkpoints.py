"""Official checkpoint layouts, the reference trainer's tuned layout, gapt tuned files, and their errors."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gapt import CheckpointError, build_model, load_model

from conftest import tiny_model


def encoder_state(backbone="test_mae_tiny", seed=1):
    return {k: v.clone() for k, v in tiny_model(backbone, seed=seed).backbone.state_dict().items()}


def same_backbone(model, sd):
    own = model.backbone.state_dict()
    return set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


def test_mae_official_layout_drops_decoder(tmp_path):
    sd = encoder_state()
    raw = {"model": {**sd, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
                     "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_pred.bias": torch.zeros(192)}}
    torch.save(raw, tmp_path / "mae_pretrain_vit_tiny.pth")
    model = build_model("test_mae_tiny", method="gated", num_prompts=2, num_classes=3,
                        weights=str(tmp_path / "mae_pretrain_vit_tiny.pth"))
    assert same_backbone(model, sd)


@pytest.mark.parametrize("layout", ["pretrain", "linear"])
def test_mocov3_layouts(tmp_path, layout, caplog):
    sd = encoder_state("test_moco_tiny")
    if layout == "pretrain":
        state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
        state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()})
        state.update({"module.base_encoder.head.0.weight": torch.zeros(8, 32),
                      "module.predictor.0.weight": torch.zeros(8, 8)})
        expected_log = "pre-training checkpoint"
    else:
        state = {f"module.{k}": v for k, v in sd.items()}
        state.update({"module.head.weight": torch.zeros(1000, 32), "module.head.bias": torch.zeros(1000)})
        expected_log = "linear-probe checkpoint"
    path = tmp_path / f"moco_{layout}.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": state}, path)
    with caplog.at_level("INFO", logger="gapt"):
        model = build_model("test_moco_tiny", method="vpt-shallow", num_prompts=2, num_classes=3, weights=str(path))
    assert same_backbone(model, sd)
    assert expected_log in caplog.text


def test_dino_plain_state_dict_and_safetensors(tmp_path):
    sd = encoder_state("test_dino_tiny")
    torch.save(sd, tmp_path / "dino_deitsmall8_pretrain.pth")
    model = build_model("test_dino_tiny", method="vpt-deep", num_prompts=2, num_classes=3,
                        weights=str(tmp_path / "dino_deitsmall8_pretrain.pth"))
    assert same_backbone(model, sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = build_model("test_dino_tiny", method="linear", num_classes=3, weights=str(tmp_path / "model.safetensors"))
    assert same_backbone(model, sd)


def test_other_image_size_interpolates_position_embedding(tmp_path):
    sd = encoder_state()
    # a known ramp on the 4x4 grid, token t = 4 * row + col: channel c = (c + 1) * row + 0.1 * c * col ** 2
    rows, cols = torch.arange(4.0)[:, None].expand(4, 4), torch.arange(4.0)[None, :].expand(4, 4)
    chans = torch.arange(32.0)[:, None, None]
    ramp = (chans + 1) * rows + 0.1 * chans * cols ** 2                       # (32, 4, 4)
    sd["pos_embed"] = torch.cat([torch.randn(1, 1, 32), ramp.reshape(32, 16).T[None]], dim=1)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    model = build_model("test_mae_tiny", method="gated", num_prompts=2, num_classes=3, weights=str(tmp_path / "mae.pth"),
                        image_size=48)
    assert model.backbone.pos_embed.shape == (1, 1 + 36, 32)
    grid = F.interpolate(ramp[None], size=(6, 6), mode="bicubic", align_corners=False)[0]  # (32, 6, 6)
    for r in range(6):
        for c in range(6):
            assert torch.allclose(model.backbone.pos_embed[0, 1 + 6 * r + c], grid[:, r, c], atol=1e-5), (r, c)
    assert torch.equal(model.backbone.pos_embed[:, 0], sd["pos_embed"][:, 0])  # CLS untouched
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    # MoCo's fixed sin-cos embedding is rebuilt for the new grid, not interpolated
    torch.save({"state_dict": {f"module.{k}": v for k, v in encoder_state("test_moco_tiny").items()}},
               tmp_path / "moco.pth.tar")
    moco = build_model("test_moco_tiny", method="gated", num_prompts=2, num_classes=3,
                       weights=str(tmp_path / "moco.pth.tar"), image_size=48)
    from test_first_use import moco_v3_sincos
    assert torch.allclose(moco.backbone.pos_embed, moco_v3_sincos(6, 6, 32), atol=1e-6)  # MoCo's formula


def test_checkpoint_errors_name_the_keys(tmp_path):
    sd = encoder_state()
    bad = dict(sd)
    del bad["blocks.1.attn.qkv.weight"]
    bad["blocks.9.mlp.fc1.weight"] = torch.zeros(3)
    bad["norm.weight"] = torch.ones(64)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        build_model("test_mae_tiny", weights=str(tmp_path / "bad.pth"), num_classes=3)
    msg = str(e.value)
    assert "bad.pth" in msg and "missing keys: blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys: blocks.9.mlp.fc1.weight" in msg
    assert "mis-shaped keys: norm.weight: checkpoint (64,) vs model (32,)" in msg


def test_not_a_checkpoint_errors(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth is not a checkpoint torch can read safely"):
        build_model("test_mae_tiny", weights=str(tmp_path / "notes.pth"))
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nothere.pth"):
        build_model("test_mae_tiny", weights=str(tmp_path / "nothere.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        build_model("test_mae_tiny", weights=str(tmp_path / "list.pth"))
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable safetensors"):
        build_model("test_mae_tiny", weights=str(tmp_path / "junk.safetensors"))


class Payload:  # a pickle that would run code: must be refused, never unpickled
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_model("test_mae_tiny", weights=str(tmp_path / "evil.pth"))


def test_random_backbone_warns():
    with pytest.warns(UserWarning, match="random weights"):
        build_model("test_mae_tiny", num_classes=2, num_prompts=1)


# -- tuned files ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gated", "vpt-deep", "linear", "vpt-at-block"])
def test_save_load_tuned_round_trip(tmp_path, method, images):
    kw = {"insert_at_block": 2} if method == "vpt-at-block" else {}
    model = tiny_model(method=method, learn_temperature=method == "gated", **kw)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.class_names = ["a", "b", "c", "d", "e"]
    path = tmp_path / "tuned.safetensors"
    model.save_tuned(str(path))
    fresh = tiny_model(method=method, seed=0, learn_temperature=method == "gated", **kw)  # same backbone seed
    with torch.no_grad():  # make the fresh tuned tensors different first
        for p in fresh.tuned_parameters().values():
            p.zero_()
    fresh.load_tuned(str(path))
    assert torch.equal(fresh(images), model(images))
    assert fresh.class_names == ["a", "b", "c", "d", "e"]
    # the file holds the tuned tensors and no backbone weight
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == 4 * model.num_tuned()


def test_tuned_file_gets_the_umask_permissions(tmp_path):
    """safetensors alone creates 0600 files; a tuned file is meant to be shared like any other."""
    old = os.umask(0o022)
    try:
        tiny_model(method="gated").save_tuned(str(tmp_path / "t.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "t.safetensors.tmp").exists()


def test_load_model_rebuilds_from_file(tmp_path, images):
    sd = encoder_state()
    torch.save({"model": sd}, tmp_path / "mae.pth")
    model = build_model("test_mae_tiny", method="gated", num_prompts=2, num_classes=3, weights=str(tmp_path / "mae.pth"),
                        learn_temperature=True, gate_init=3.0)
    model.eval().save_tuned(str(tmp_path / "t.safetensors"))
    again = load_model(str(tmp_path / "t.safetensors"), weights=str(tmp_path / "mae.pth"))
    assert (again.method, again.num_prompts, again.gate_init) == ("gated", 2, 3.0)
    assert torch.equal(again(images), model(images))


def test_tuned_file_written_before_the_method_parts_still_loads(tmp_path, images):
    """Files from before the PEFT keys existed (no lora_* / adapter_* in the metadata) load as they did."""
    import json
    from safetensors import safe_open
    sd = encoder_state()
    torch.save({"model": sd}, tmp_path / "mae.pth")
    model = build_model("test_mae_tiny", method="gated", num_prompts=2, num_classes=3, weights=str(tmp_path / "mae.pth"),
                        learn_temperature=True)
    model.eval().save_tuned(str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = {k: v for k, v in json.loads(meta["config"]).items() if not k.startswith(("lora_", "adapter_"))}
    save_file(tensors, str(tmp_path / "old.safetensors"), {**meta, "config": json.dumps(config)})
    again = load_model(str(tmp_path / "old.safetensors"), weights=str(tmp_path / "mae.pth"))
    assert torch.equal(again(images), model(images))
    lora = tiny_model(method="lora", lora_rank=2)
    lora.save_tuned(str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="differs in: lora_rank"):
        tiny_model(method="lora", lora_rank=4).load_tuned(str(tmp_path / "lora.safetensors"))


def test_tuned_file_mismatch_errors(tmp_path):
    tiny_model(method="gated", num_prompts=3).save_tuned(str(tmp_path / "g3.safetensors"))
    with pytest.raises(CheckpointError) as e:
        tiny_model(method="gated", num_prompts=4).load_tuned(str(tmp_path / "g3.safetensors"))
    assert "holds a tuned model with backbone='test_mae_tiny', method='gated', num_prompts=3" in str(e.value)
    assert "this model expects backbone='test_mae_tiny', method='gated', num_prompts=4" in str(e.value)
    assert "differs in: num_prompts" in str(e.value)
    with pytest.raises(CheckpointError, match="differs in: method"):
        tiny_model(method="vpt-shallow", num_prompts=3).load_tuned(str(tmp_path / "g3.safetensors"))
    with pytest.raises(CheckpointError, match="differs in: backbone"):
        tiny_model("test_moco_tiny", method="gated", num_prompts=3).load_tuned(str(tmp_path / "g3.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a gapt tuned file"):
        tiny_model().load_tuned(str(tmp_path / "plain.safetensors"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither a gapt tuned file"):
        tiny_model().load_tuned(str(tmp_path / "other.pth"))


# -- the reference GaPT/VPT trainer's saved models (SPEC §4) -----------------------------------
def reference_file(model, path, with_encoder=True):
    sd = {}
    if with_encoder:
        sd.update({f"enc.{k}": v for k, v in model.backbone.state_dict().items()})
    names = {"prompt_embeddings": "enc.prompt_embeddings", "deep_prompt_embeddings": "enc.deep_prompt_embeddings",
             "gate_logits": "enc.gate_logit", "temperature": "enc.temp", "head.weight": "head.last_layer.weight",
             "head.bias": "head.last_layer.bias"}
    for n, p in model.tuned_parameters().items():
        sd[names[n]] = p.detach().clone()
    torch.save({"model": sd}, path)


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
@pytest.mark.parametrize("method,temp", [("gated", True), ("vpt-shallow", False), ("vpt-deep", False)])
def test_reference_trainer_layout_gives_same_logits(tmp_path, backbone, method, temp, images):
    trained = tiny_model(backbone, seed=5, method=method, learn_temperature=temp)
    with torch.no_grad():
        for p in trained.tuned_parameters().values():
            p.add_(torch.randn_like(p) * 0.2)
    reference_file(trained, tmp_path / "model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = build_model(backbone, method=method, num_prompts=3, num_classes=5, learn_temperature=temp)
    fresh.load_tuned(str(tmp_path / "model.pth"))  # encoder weights come from the file too
    assert torch.allclose(fresh.eval()(images), trained(images), atol=1e-6)


def test_reference_layout_mismatch_is_explained(tmp_path):
    reference_file(tiny_model(method="vpt-deep"), tmp_path / "deep.pth", with_encoder=False)
    with pytest.raises(CheckpointError, match="holds a tuned model with method='vpt-deep'.*differs in: method"):
        tiny_model(method="gated").load_tuned(str(tmp_path / "deep.pth"))


def test_any_timm_vit_name_and_non_vit_error(images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("vit_tiny_patch16_224", method="gated", num_prompts=2, num_classes=4, image_size=32)
        assert model.backbone_name == "vit_tiny_patch16_224" and model.pooling == "cls"
        assert model(images).shape == (3, 4)
        with pytest.raises(ValueError, match="'resnet18' is a ResNet, not a VisionTransformer"):
            build_model("resnet18")


def test_plain_timm_state_dict_with_classifier_head_loads(tmp_path, caplog):
    import logging
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    from conftest import TINY
    torch.manual_seed(3)
    # what a user has: timm's own model with a 10-class head, saved as state_dict()
    timm_vit = VisionTransformer(img_size=32, num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **TINY)
    sd = timm_vit.state_dict()
    assert {"head.weight", "head.bias"} <= set(sd)
    encoder = {k: v for k, v in sd.items() if not k.startswith("head.")}
    torch.save(sd, tmp_path / "timm_vit.pth")
    save_file({**sd, "fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)},
              str(tmp_path / "timm_vit.safetensors"))
    for name in ("timm_vit.pth", "timm_vit.safetensors"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gapt"):
            model = build_model("test_mae_tiny", method="gated", num_prompts=2, num_classes=3,
                                weights=str(tmp_path / name))
        assert same_backbone(model, encoder)
        dropped = [r.getMessage() for r in caplog.records if "classifier head" in r.getMessage()]
        assert len(dropped) == 1 and "head.weight" in dropped[0] and name in dropped[0]
        assert ("fc_norm.weight" in dropped[0]) == name.endswith(".safetensors")
    # any other unexpected key is still an error
    torch.save({**sd, "head_dist.weight": torch.zeros(10, 32)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: head_dist.weight"):
        build_model("test_mae_tiny", num_classes=3, weights=str(tmp_path / "extra.pth"))
