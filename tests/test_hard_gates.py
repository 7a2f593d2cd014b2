"""Hard gates (SPEC §9, Table 4's "w/ GH"): 0/1 in eval from the sign of gamma, 0/1 forward with a
straight-through gradient in training, seeded Gumbel noise reproduced on resume, config/API/file."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from gapt.config import ConfigError, load_config
from gapt.engine.trainer import train
from gapt.model import load_model
from test_engine import TINY, make_folder_dataset, metrics_without_timing


def manual_forward(model, images, gates):
    """SPEC §2 written out with given gate values (a list of floats, one per block but the last)."""
    vit = model.backbone
    x = vit._pos_embed(vit.patch_embed(images))
    pre, n_p = vit.num_prefix_tokens, model.num_prompts
    x = torch.cat([x[:, :pre], model.prompt_embeddings.expand(len(images), -1, -1), x[:, pre:]], dim=1)
    for i, blk in enumerate(vit.blocks):
        out = blk(x)
        if i < model.depth - 1:
            g = gates[i]
            out = torch.cat([out[:, :pre], g * out[:, pre:pre + n_p] + (1 - g) * x[:, pre:pre + n_p],
                             out[:, pre + n_p:]], dim=1)
        x = out
    return model.head(model.pool(x))


def test_eval_gates_are_the_sign_of_gamma(images):
    model = tiny_model(method="gated", gate_type="hard", prompt_dropout=0.0)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0.7, -0.2, 3.0]))
    model.eval()
    assert model.gate_values().tolist() == [1.0, 0.0, 1.0]
    expected = manual_forward(model, images, [1.0, 0.0, 1.0])
    assert torch.allclose(model(images), expected, atol=1e-5)
    # soft gates with the same gamma give another output (the hard path is really taken)
    soft = manual_forward(model, images, [1 / (1 + math.exp(-v)) for v in (0.7, -0.2, 3.0)])
    assert not torch.allclose(expected, soft, atol=1e-3)


def spec9_gates(gamma, t, generator):
    """SPEC §9 by hand, in float64: G1, G2 = -log(-log(u)) from one (2, L-1) uniform draw, s = sigmoid((gamma
    + G1 - G2) / t), g = 1[s > 0.5]; also returns s (the straight-through gradient's source)."""
    u = torch.rand(2, len(gamma), generator=generator).double()
    g1, g2 = -torch.log(-torch.log(u))
    s = 1 / (1 + torch.exp(-(gamma.double() + g1 - g2) / t))
    return (s > 0.5).double(), s


def test_training_forward_is_binary_and_the_gradient_reaches_gamma():
    model = tiny_model(method="gated", gate_type="hard", gate_temperature=0.5, prompt_dropout=0.0)
    model.train()
    weights = torch.tensor([1.0, 2.0, 3.0])
    for seed in range(300):  # a value of 0.99999994 (hard + s - s.detach()) shows up in a quarter of draws
        with torch.no_grad():
            model.gate_logits.copy_(torch.randn(3, generator=torch.Generator().manual_seed(1000 + seed)))
        model.gate_logits.grad = None
        model.seed_gate_noise(seed)
        g = model.gate_values()
        expected, s = spec9_gates(model.gate_logits.detach(), 0.5, torch.Generator().manual_seed(seed))
        assert g.dtype == torch.float32 and all(v in (0.0, 1.0) for v in g.tolist()), (seed, g.tolist())
        assert g.tolist() == expected.tolist(), seed  # exactly 0.0 / 1.0, as the formula decides
        # straight-through: d g_l / d gamma_l = d s_l / d gamma_l = s (1 - s) / t
        (g * weights).sum().backward()
        assert torch.allclose(model.gate_logits.grad.double(), weights.double() * s * (1 - s) / 0.5, atol=1e-6)


def test_training_loss_gradient_reaches_gamma(images):
    model = tiny_model(method="gated", gate_type="hard", gate_init=0.0, prompt_dropout=0.0)
    model.train()
    model(images).logsumexp(1).sum().backward()
    assert model.gate_logits.grad is not None and model.gate_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_noise_is_seeded_and_drawn_once_per_step(images, checkpointing):
    model = tiny_model(method="gated", gate_type="hard", gate_init=0.0, prompt_dropout=0.0)
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0.2, -0.1, 0.05]))
    model.grad_checkpointing = checkpointing  # a recomputed block must not draw again
    model.train()
    model.seed_gate_noise(3)
    by_hand = torch.Generator().manual_seed(3)  # advanced by hand: one (2, L-1) draw per training step
    drawn = []
    for _ in range(6):
        gates, _ = spec9_gates(model.gate_logits.detach(), 1.0, by_hand)
        drawn.append(tuple(gates.tolist()))
        logits = model(images)
        logits.logsumexp(1).sum().backward()  # the backward pass draws nothing
        assert torch.equal(model.gate_noise.get_state(), by_hand.get_state())
        # this step's forward used exactly this draw
        assert torch.allclose(logits, manual_forward(model, images, gates.float().tolist()), atol=1e-5)
    assert len(set(drawn)) > 1  # gamma near 0: the gates flip between steps
    model.eval()
    model(images)
    assert torch.equal(model.gate_noise.get_state(), by_hand.get_state())  # evaluation draws nothing
    model.train()
    model.seed_gate_noise(3)  # the same seed, the same gates
    assert [tuple(model.gate_values().tolist()) for _ in range(6)] == drawn


def test_bad_gate_settings_are_errors():
    with pytest.raises(ValueError, match="needs method='gated'"):
        tiny_model(method="vpt-shallow", gate_type="hard")
    with pytest.raises(ValueError, match="gate_type"):
        tiny_model(method="gated", gate_type="sharp")
    with pytest.raises(ConfigError, match="gate_type"):
        load_config(None, ["method=vpt-deep", "gate_type=hard"])
    with pytest.raises(ConfigError, match="gate_temperature"):
        load_config(None, ["gate_type=hard", "gate_temperature=0"])
    with pytest.raises(ConfigError, match="gate_type"):
        load_config(None, ["gate_type=binary"])


def test_resume_reproduces_the_noise_and_the_file_keeps_the_gate_type(tmp_path):
    data = make_folder_dataset(tmp_path / "colours")
    over = [*TINY, "method=gated", "gate_type=hard", "gate_temperature=0.7", "gate_init=0.3", "train.epochs=3",
            "train.lr=0.5", "data.format=folder", f"data.root={data}"]
    full = train(load_config(None, over + [f"out={tmp_path / 'full'}"]))
    cfg = load_config(None, over + [f"out={tmp_path / 'cut'}"])
    train(cfg, stop_after_epoch=0)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    # the saved Gumbel stream has moved on from its seed: a resume that reseeded would redraw epoch 0's noise
    assert not torch.equal(state["rng"]["gate_noise"], torch.Generator().manual_seed(42).get_state())
    resumed = train(cfg, resume=True)
    assert metrics_without_timing(tmp_path / "cut") == metrics_without_timing(tmp_path / "full")
    assert resumed["metrics"] == full["metrics"]
    a, b = load_file(tmp_path / "full" / "tuned.safetensors"), load_file(tmp_path / "cut" / "tuned.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["gate_type"] == "hard" and full["gate_temperature"] == 0.7
    model = load_model(str(tmp_path / "full" / "tuned.safetensors"), random_seed=42)
    assert model.gate_type == "hard" and model.gate_temperature == 0.7
    assert set(model.eval().gate_values().tolist()) <= {0.0, 1.0}


def test_selection_ratio_of_hard_gates_uses_the_eval_gates():
    from gapt.model import selection_ratio
    model = tiny_model(method="gated", gate_type="hard")
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([0.7, -0.2, 3.0]))
    out = selection_ratio(model)
    # g = [1, 0, 1]: g~_1 = 1 * (1 - 0) * (1 - 1) = 0, g~_2 = 0, g~_3 = 1
    assert out["gate"] == [1.0, 0.0, 1.0] and out["selection_ratio"] == [0.0, 0.0, 1.0]
    assert out["inserted_prompt_weight"] == 0.0
    with torch.no_grad():
        model.gate_logits.fill_(-1.0)  # every gate closed: the inserted prompt reaches the last block untouched
    out = selection_ratio(model)
    assert out["selection_ratio"] == [0.0, 0.0, 0.0] and out["inserted_prompt_weight"] == 1.0
