"""VFPT (SPEC §12.3) against a transcription of its official code, run on the same tiny timm ViT.

The transcription below is written out from runtsang/VFPT @ 1b3d9846,
``src/models/vit_prompt/vit_fourier_mae.py`` (the MoCo file is the same but for its readout):
``FNetBlock.forward``, ``PromptedVisionTransformer.embeddings``, ``incorporate_prompt`` and ``forward_features``
(DEEP, LOCATION "prepend", FOURIER_LOCATION "prepend", prompt_proj Identity), with the attributes it reads passed
in. gapt's own functions are never the reference.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model

D, L = 32, 4


# -- the official code, transcribed ------------------------------------------------------------------
class OfficialFNetBlock(nn.Module):
    """runtsang/VFPT src/models/vit_prompt/vit_fourier_mae.py::FNetBlock"""

    def forward(self, x):
        x = torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real
        return x


class OfficialPromptedVFPT:
    """runtsang/VFPT src/models/vit_prompt/vit_fourier_mae.py::PromptedVisionTransformer (MAE: VIT_POOL_TYPE
    "original" -> x[:, 1:].mean(1) then fc_norm) and vit_fourier_moco.py's readout (norm(x)[:, 0])."""

    def __init__(self, vit, prompt_embeddings, deep_prompt_embeddings, num_tokens, fourier_percentage, prompt_dropout,
                 readout, fc_norm=None):
        self.vit, self.blocks = vit, vit.blocks
        self.prompt_embeddings, self.deep_prompt_embeddings = prompt_embeddings, deep_prompt_embeddings
        self.num_tokens = num_tokens
        self.prompt_dropout = prompt_dropout
        self.FT = OfficialFNetBlock()
        self.prompt_proj = nn.Identity()
        if fourier_percentage != 0.0:
            self.fourier_num_tokens = math.floor(num_tokens * fourier_percentage)
        else:
            self.fourier_num_tokens = 0
        self.readout, self.fc_norm = readout, fc_norm

    def embeddings(self, x):
        B = x.shape[0]
        x = self.vit.patch_embed(x)
        if x.ndim == 4:  # timm's dynamic-size patch embedding keeps the grid; the official one flattens
            x = x.flatten(1, 2)
        cls_tokens = self.vit.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.vit.pos_embed
        x = self.vit.pos_drop(x)
        return x

    def incorporate_prompt(self, x):
        B = x.shape[0]
        x = self.embeddings(x)
        deep_prompt_fourier_emb = self.prompt_dropout(self.prompt_proj(
            self.prompt_embeddings[0][:self.fourier_num_tokens]).expand(B, -1, -1))
        if self.fourier_num_tokens == self.num_tokens:
            x = torch.cat((x[:, :1, :], self.FT(deep_prompt_fourier_emb), x[:, 1:, :]), dim=1)
        else:  # FOURIER_LOCATION == 'prepend'
            x = torch.cat((
                x[:, :1, :],
                self.FT(deep_prompt_fourier_emb),
                self.prompt_dropout(self.prompt_proj(self.prompt_embeddings[0][self.fourier_num_tokens:]).expand(B, -1, -1)),
                x[:, 1:, :]
            ), dim=1)
        return x

    def forward_features(self, x):
        x = self.incorporate_prompt(x)
        B = x.shape[0]
        num_layers = len(self.blocks)
        for i in range(num_layers):
            if i == 0:
                x = self.blocks[i](x)
            else:
                if self.fourier_num_tokens != self.num_tokens:
                    deep_prompt_emb = self.prompt_dropout(self.prompt_proj(
                        self.deep_prompt_embeddings[i - 1][self.fourier_num_tokens:]).expand(B, -1, -1))
                deep_prompt_fourier_emb = self.prompt_dropout(self.prompt_proj(
                    self.deep_prompt_embeddings[i - 1][:self.fourier_num_tokens]).expand(B, -1, -1))
                if self.fourier_num_tokens == self.num_tokens:
                    x = torch.cat((x[:, :1, :], self.FT(deep_prompt_fourier_emb),
                                   x[:, (1 + self.num_tokens):, :]), dim=1)
                else:
                    x = torch.cat((x[:, :1, :], self.FT(deep_prompt_fourier_emb), deep_prompt_emb,
                                   x[:, (1 + self.num_tokens):, :]), dim=1)
                x = self.blocks[i](x)
        if self.readout == "mae":
            x = x[:, 1:, :].mean(dim=1)  # global pool without cls token
            return self.fc_norm(x)
        x = self.vit.norm(x)
        return x[:, 0]


def official_for(model, readout="mae", fc_norm=None, prompt_dropout=None):
    return OfficialPromptedVFPT(model.backbone, model.prompt_embeddings, model.deep_prompt_embeddings,
                                model.num_prompts, model.settings.fourier_fraction,
                                prompt_dropout or model.prompt_dropout, readout, fc_norm)


def randomised(model, seed=3):
    """Prompts moved off their init (larger values make the FFT's magnitudes matter) and a random head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class Squash(nn.Module):
    """A deterministic, elementwise, non-linear stand-in for dropout: tells 'before the FFT' from 'after'."""

    def forward(self, x):
        return torch.tanh(3 * x) + 0.1


# -- the forward equals the official one -------------------------------------------------------------
@pytest.mark.parametrize("prompts,alpha", [(4, 1.0), (4, 0.5), (5, 0.3), (3, 0.7)])
def test_vfpt_equals_official_forward_mae_fresh_fc_norm(prompts, alpha, images):
    model = randomised(tiny_model(method="vfpt", num_prompts=prompts, fourier_fraction=alpha, pooling="mean_fc_norm"))
    fc_norm = nn.LayerNorm(D, eps=1e-6)  # the VPT codebase's fresh, frozen fc_norm (gamma 1, beta 0)
    with torch.no_grad():
        ours = model.forward_features(images)
        theirs = official_for(model, "mae", fc_norm).forward_features(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert model.part("prompts").num_fourier == math.floor(prompts * alpha)


def test_vfpt_equals_official_forward_moco(images):
    model = randomised(tiny_model("test_moco_tiny", method="vfpt", num_prompts=4, fourier_fraction=0.5))
    assert model.pooling == "cls"
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images),
                                   official_for(model, "moco").forward_features(images), rtol=1e-5, atol=1e-5)


def test_vfpt_mean_pooling_with_the_backbone_norm(images):
    """gapt's MAE default readout (the pretrained norm after the mean, as GaPT's code) with the same forward."""
    model = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5))
    assert model.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images),
                                   official_for(model, "mae", model.backbone.norm).forward_features(images),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_dropout_comes_before_the_fft_and_applies_per_slice(alpha, images):
    """Training mode with a non-linear stand-in for the dropout, the same module in both: equal only if gapt
    applies it to the prompts before the transform (a linear stand-in would commute with the FFT)."""
    model = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=alpha, pooling="mean_fc_norm"))
    model.prompt_dropout = Squash()
    model.train()
    ours = model.forward_features(images)
    theirs = official_for(model, "mae", nn.LayerNorm(D, eps=1e-6)).forward_features(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and gradients flow to both prompt tensors through the real part of the FFT
    (ours * torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))).sum().backward()  # LN sums to 0
    assert model.prompt_embeddings.grad.abs().sum() > 0 and model.deep_prompt_embeddings.grad.abs().sum() > 0


def test_real_dropout_draws_a_mask_per_sample_and_is_off_in_eval(images):
    model = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=1.0, prompt_dropout=0.5))
    same = images[:1].expand(4, -1, -1, -1)
    model.train()
    torch.manual_seed(0)
    out = model.forward_features(same)
    assert not torch.allclose(out[0], out[1])  # one dropout mask per sample, as expand-then-dropout
    model.eval()
    with torch.no_grad():
        out = model.forward_features(same)
    torch.testing.assert_close(out[0], out[1])


def test_fft_is_unnormalised_real_part_over_the_fourier_prompts_only():
    """SPEC §12.3 quirks on the inserted slice: F[0, 0] = sum of the Fourier prompts; the rest pass unchanged."""
    from gapt.model.parts.fourier import fourier_prompts
    p = torch.randn(2, 5, D)
    out = fourier_prompts(p, 3)
    torch.testing.assert_close(out[:, 0, 0], p[:, :3].sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], p[:, 3:])
    torch.testing.assert_close(out[:, :3], OfficialFNetBlock()(p[:, :3]))


# -- tensors, init, settings ---------------------------------------------------------------------------
def test_vfpt_tensors_are_vpt_deep_names_shapes_and_init():
    model = tiny_model(method="vfpt", num_prompts=6, fourier_fraction=0.5)
    assert tuple(model.prompt_embeddings.shape) == (1, 6, D)
    assert tuple(model.deep_prompt_embeddings.shape) == (L - 1, 6, D)
    bound = math.sqrt(6.0 / (3 * 8 * 8 + D))  # VPT's U(+-v) with the tiny ViT's 8x8 patches
    for p in (model.prompt_embeddings, model.deep_prompt_embeddings):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    assert set(model.tuned_parameters()) == {"prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"}
    assert model.tuned_counts()["prompts"] == L * 6 * D
    assert model.prompt_insertions()[0] == ("prompt_embeddings", 0, 1) and len(model.prompt_insertions()) == L


@pytest.mark.parametrize("kw,word", [(dict(num_prompts=1, fourier_fraction=0.5), "no Fourier prompt"),
                                     (dict(num_prompts=4, fourier_fraction=0.0), "(0, 1]"),
                                     (dict(num_prompts=4, fourier_fraction=1.5), "(0, 1]")])
def test_bad_fourier_fraction_is_refused(kw, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace("]", r"\]")):
        tiny_model(method="vfpt", **kw)


def test_fourier_fraction_needs_vfpt():
    from gapt.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="fourier_fraction=0.5 needs the vfpt part: use method=vfpt"):
        load_config(None, ["method=vpt-deep", "fourier_fraction=0.5"])


# -- composition ---------------------------------------------------------------------------------------
def test_vfpt_with_temperature_one_is_vfpt(images):
    plain = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5))
    tempered = tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5, learn_temperature=True)
    tempered.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(tempered.temperature, torch.ones(L))
        torch.testing.assert_close(tempered(images), plain(images), rtol=1e-5, atol=1e-5)
        tempered.temperature.fill_(0.5)
        assert not torch.allclose(tempered(images), plain(images))


def test_vfpt_with_lora_at_start_is_vfpt(images):
    plain = randomised(tiny_model(method="vfpt", num_prompts=4))
    both = tiny_model(method="vfpt+lora", num_prompts=4)
    state = {k.replace(".attn.qkv.", ".attn.qkv.base_layer."): v for k, v in plain.state_dict().items()}
    missing, unexpected = both.load_state_dict(state, strict=False)  # the same frozen backbone, prompts and head
    assert not unexpected and all(".lora_" in k for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(both(images), plain(images), rtol=1e-5, atol=1e-5)  # LoRA's B = 0 at start


@pytest.mark.parametrize("method,other", [("vfpt+gated", "gated"), ("vfpt+vpt-deep", "vpt-deep"),
                                          ("vfpt+e2vpt", "e2vpt"), ("vfpt+linear", "linear")])
def test_impossible_compositions_name_both(method, other):
    with pytest.raises(ValueError) as e:
        tiny_model(method=method)
    assert "'vfpt'" in str(e.value) and f"'{other}'" in str(e.value)


# -- files -----------------------------------------------------------------------------------------------
def official_checkpoint(model, fc_norm_instead_of_norm=True):
    """What VFPT's trainer saves (fvcore Checkpointer: {"model": state_dict} of ViT(enc=..., head=MLP)): the
    prompts, the frozen encoder (MAE: fc_norm, norm deleted) and head.last_layer."""
    sd = {"enc.prompt_embeddings": model.prompt_embeddings.detach().clone(),
          "enc.deep_prompt_embeddings": model.deep_prompt_embeddings.detach().clone(),
          "head.last_layer.weight": model.head.weight.detach().clone(),
          "head.last_layer.bias": model.head.bias.detach().clone()}
    for k, v in model.backbone.state_dict().items():
        if fc_norm_instead_of_norm and k.startswith("norm."):
            sd["enc.fc_" + k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
        else:
            sd["enc." + k] = v.clone()
    return {"model": sd}


def test_official_vfpt_checkpoint_loads(tmp_path, images):
    source = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5, pooling="mean_fc_norm"))
    path = tmp_path / "last_model.pth"
    torch.save(official_checkpoint(source), path)
    target = tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5, pooling="mean_fc_norm", seed=9)
    assert not torch.equal(target.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target.load_tuned(str(path))
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_gapt_tuned_file_round_trip_and_alpha_identity(tmp_path, images):
    from gapt.model.checkpoints import CheckpointError
    source = randomised(tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5))
    source.save_tuned(str(tmp_path / "t.safetensors"))
    again = tiny_model(method="vfpt", num_prompts=4, fourier_fraction=0.5).load_tuned(str(tmp_path / "t.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(images), source(images))
    other = tiny_model(method="vfpt", num_prompts=4, fourier_fraction=1.0)
    with pytest.raises(CheckpointError, match="fourier_fraction"):
        other.load_tuned(str(tmp_path / "t.safetensors"))


# -- presets and grid ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["mae_vitb16", "mocov3_vitb16"])
@pytest.mark.parametrize("benchmark,tasks", [("vtab", ["dtd", "cifar", "smallnorb_ele"]), ("fgvc", ["cub", "cars"])])
def test_vfpt_presets_are_the_readme_recipe(backbone, benchmark, tasks):
    """VFPT's README command: deep, NUM_TOKENS 10, DROPOUT 0.1, FOURIER_PERCENTAGE 1.0, batch 64; SGD, cosine."""
    from gapt.config import load_config
    for task in tasks:
        cfg = load_config(f"{benchmark}/{backbone}/vfpt/{task}")
        assert (cfg.method, cfg.num_prompts, cfg.fourier_fraction, cfg.prompt_dropout) == ("vfpt", 10, 1.0, 0.1)
        assert (cfg.train.batch_size, cfg.train.optimizer, cfg.train.momentum, cfg.train.epochs) == (64, "sgd", 0.9, 100)
        assert cfg.pooling == ("mean_fc_norm" if backbone.startswith("mae") else "")


def test_vfpt_grid_is_the_tune_script_at_batch_64():
    from gapt.sweep.grid import build_grid
    grid = build_grid("vfpt", [], {})
    assert [float(v) for v in grid["train.lr"]] == [x * 64 / 256 for x in (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)]
    assert [float(v) for v in grid["train.weight_decay"]] == [0.01, 0.001, 0.0001, 0.0]
