"""HF peft interop, both directions, with peft itself: ``model.save_peft`` writes an adapter that
``PeftModel.from_pretrained`` loads on the same timm ViT with the same logits, and ``model.load_peft`` (and
``gapt export --from-peft``) reads an adapter peft trained on a timm ViT into a gapt LoRA model."""
import copy
import json

import pytest
import torch

from conftest import tiny_model
from gapt import load_model
from gapt.cli import main
from gapt.model import CheckpointError, timm_classifier
from test_parts_peft import frozen_state, randomise, timm_vit_like

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
@pytest.mark.parametrize("targets", ["qkv", "q,v"])
def test_gapt_to_peft_gives_the_same_logits(tmp_path, backbone, targets, images):
    model = randomise(tiny_model(backbone, method="lora", lora_rank=4, lora_alpha=16, lora_targets=targets))
    model.save_peft(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["qkv"] and config["modules_to_save"] == ["head"]
    assert (config["r"], config["lora_alpha"]) == ((4, 16) if targets == "qkv" else (8, 32))  # q,v: rank 2r
    for base in (timm_classifier(model, merged=False), timm_vit_like(model)):  # gapt's and an independent build
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), model(images), rtol=1e-5, atol=1e-5)


def peft_trained_adapter(model, folder, r=4, alpha=8):
    """An adapter as a peft user makes one: LoraConfig on the timm ViT, trained (here: random), saved."""
    vit = timm_vit_like(model)
    trained = peft.get_peft_model(vit, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["qkv"],
                                                       modules_to_save=["head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    trained.save_pretrained(str(folder))
    return trained.eval()


def test_peft_to_gapt_gives_the_same_logits(tmp_path, images):
    model = tiny_model(method="lora", lora_rank=4, lora_alpha=8)
    trained = peft_trained_adapter(model, tmp_path / "adapter")
    model.load_peft(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained(images), rtol=1e-5, atol=1e-5)
    other = tiny_model(method="lora", lora_rank=8, lora_alpha=8)
    with pytest.raises(CheckpointError, match="r=4.*lora_rank=8"):
        other.load_peft(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="no lora part"):
        tiny_model(method="bitfit").load_peft(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="also trains"):
        tiny_model(method="lora+bitfit").save_peft(str(tmp_path / "x"))


def test_cli_from_peft_writes_a_gapt_tuned_file(tmp_path, images, capsys):
    model = tiny_model(method="lora", lora_rank=4, lora_alpha=8)
    trained = peft_trained_adapter(model, tmp_path / "adapter")
    torch.save({"model": frozen_state(model)}, tmp_path / "mae_tiny.pth")  # the frozen backbone, MAE layout
    out = tmp_path / "tuned.safetensors"
    assert main(["export", "--from-peft", str(tmp_path / "adapter"), "--backbone", "test_mae_tiny",
                 "--weights", str(tmp_path / "mae_tiny.pth"), "--tuned", str(out)]) == 0
    gapt_model = load_model(str(out), weights=str(tmp_path / "mae_tiny.pth")).eval()
    assert gapt_model.method == "lora" and gapt_model.num_classes == 5
    with torch.no_grad():
        torch.testing.assert_close(gapt_model(images), trained(images), rtol=1e-5, atol=1e-5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                       "target_modules": ["fc1"]}))
    assert main(["export", "--from-peft", str(tmp_path / "bad"), "--backbone", "test_mae_tiny",
                 "--tuned", str(tmp_path / "t2.safetensors")]) == 1
    assert "target_modules=['fc1']" in capsys.readouterr().err
