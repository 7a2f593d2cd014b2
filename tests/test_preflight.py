"""Config mistakes found before any work: no data scanned, no run folder written, no traceback."""
import pytest

from gapt.cli import main
from gapt.model.preflight import ModelSettingsError, check_model_settings

TINY = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "num_prompts=2", "data.num_workers=0",
        "device=cpu", "train.batch_size=8", "train.warmup_epochs=1", "train.epochs=1", "data.format=folder"]


@pytest.mark.parametrize("override,message", [
    ("image_size=30", "'image_size': 30 is not a multiple of backbone 'test_mae_tiny''s patch size 8 (e.g. 24 or 32)"),
    ("backbone=mae_vitb61", "unknown backbone 'mae_vitb61' (did you mean 'mae_vitb16'?)"),
    ("weights=/no/such/mae.pth", "'weights': checkpoint file not found: /no/such/mae.pth"),
    ("insert_at_block=9", "'insert_at_block': 9, but backbone 'test_mae_tiny' has 4 blocks (1..4)"),
])
def test_model_settings_fail_before_data_and_folder(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    extra = ["method=vpt-at-block"] if override.startswith("insert_at_block") else []
    # data.root does not exist: an error about it would mean the data was looked at first
    argv = ["train", *TINY, *extra, override, f"data.root={tmp_path / 'nowhere'}", f"out={out}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "nowhere" not in err and "random weights" not in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the config is valid


def test_seg_crop_size_is_checked_against_the_patch(tmp_path, capsys):
    out = tmp_path / "seg"
    assert main(["seg", "train", "backbone=test_mae_tiny", "weights=null", "seg.crop_size=36", "data.format=seg_folder",
                 f"data.root={tmp_path / 'nowhere'}", "seg.iterations=2", "device=cpu", f"out={out}"]) == 1
    assert "'seg.crop_size': 36 is not a multiple" in capsys.readouterr().err
    assert not out.exists()


def test_valid_settings_and_timm_names_pass():
    check_model_settings("test_mae_tiny", None, 32, "vpt-at-block", 4)
    check_model_settings("vit_small_patch16_224", None, 224, "gated", 1)  # a name timm knows stays valid
    with pytest.raises(ModelSettingsError, match="'image_size': 200 is not a multiple .* patch size 16"):
        check_model_settings("vit_small_patch16_224", None, 200, "gated", 1)
    with pytest.raises(ModelSettingsError, match="needs method=vpt-at-block"):
        check_model_settings("test_mae_tiny", None, 32, "gated", 2)
    with pytest.raises(ModelSettingsError, match="'weights': backbone 'test_mae_tiny' has no timm hub weights"):
        check_model_settings("test_mae_tiny", "timm", 32, "gated", 1)
