"""gapt.merge: LoRA, SSF, BitFit (and full, linear, and compositions of them) fold into a plain timm ViT with
its head whose logits equal the tuned model's to 1e-5 relative; what cannot fold says which part in one line."""
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import gapt
from conftest import tiny_model
from gapt.model import NotMergeable
from test_parts_peft import randomise

MERGEABLE = [("lora", {}), ("lora", {"lora_targets": "q,v", "lora_rank": 3}), ("ssf", {}), ("bitfit", {}),
             ("lora+bitfit+ssf", {}), ("full", {}), ("linear", {})]


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])
@pytest.mark.parametrize("method,kw", MERGEABLE)
def test_merged_timm_vit_gives_the_tuned_logits(backbone, method, kw, images):
    model = randomise(tiny_model(backbone, method=method, **kw), scale=0.3)
    with torch.no_grad():
        before = model(images)
        merged = gapt.merge(model)
        assert type(merged) is VisionTransformer  # timm's own class, no gapt module inside
        assert all(type(m).__module__.startswith(("torch.", "timm.")) for m in merged.modules())
        assert not any(k in n for n in merged.state_dict() for k in ("lora", "ssf", "base_layer"))
        frozen_size = sum(p.numel() for n, p in model.backbone.named_parameters()
                          if not any(k in n for k in ("lora_", "ssf_")))
        assert sum(p.numel() for p in merged.parameters()) == frozen_size + model.head.weight.numel() + model.num_classes
        assert relative_error(merged(images), before) <= 1e-5
        assert torch.equal(model(images), before)  # the tuned model itself is left as it was


def test_merged_file_round_trip(tmp_path, images):
    model = randomise(tiny_model("test_moco_tiny", method="lora+ssf"), scale=0.3)
    gapt.save_merged(model, str(tmp_path / "merged.safetensors"))
    back = gapt.load_merged(str(tmp_path / "merged.safetensors"))
    with torch.no_grad():
        assert relative_error(back(images), model(images)) <= 1e-5
    assert back.class_names == model.class_names and back.global_pool == "token"


@pytest.mark.parametrize("method,part", [("gated", "gated"), ("adaptformer", "adaptformer"),
                                         ("vpt-deep+lora", "vpt-deep")])
def test_what_cannot_merge_says_so_in_one_line(method, part):
    model = tiny_model(method=method)
    with pytest.raises(NotMergeable) as e:
        gapt.merge(model)
    message = str(e.value)
    assert "\n" not in message and f"{part}:" in message and f"method '{model.method}' cannot be merged" in message


def test_eval_mode_and_no_gradients():
    merged = gapt.merge(tiny_model(method="bitfit"))
    assert not merged.training and not any(p.requires_grad for p in merged.parameters())
    assert isinstance(merged.head, nn.Linear) and merged.num_classes == 5
