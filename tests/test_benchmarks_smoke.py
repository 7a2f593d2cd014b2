"""Benchmarks at tiny sizes: each runs and prints ``NAME: X.XXx (...)`` with X.XX a finite positive number,
read back from stdout (no wall-clock assertions), and the naive reference the train-step benchmark compares
against computes gapt's function."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (demo_workers, eval_throughput, fgvc_data_path, linear_probe_cache, memory,  # noqa: E402
                        frozen_cache, protocol, run_all, train_step, vtab_data_path)
from benchmarks._common import Clock, Result, paired, print_results  # noqa: E402
from benchmarks.naive_reference import NaiveGatedViT, check_equal  # noqa: E402

TINY = "test_mae_tiny"  # registered by conftest: 4 blocks, width 32, 32x32 images
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """The benchmarks' own CPU setting (one intra-op thread): fast and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LINE = re.compile(r"^(?P<name>\w+): (?P<ratio>[^x ]+)x \((?P<detail>.*)\)$")


def printed_ratios(results, capsys):
    """What a benchmark prints (benchmarks/_common.print_results, as every script and run_all do), read back
    from stdout: {name: ratio}. Every line must be ``NAME: X.XXx (...)`` with X.XX a finite positive number."""
    capsys.readouterr()
    print_results(results)
    out = {}
    for line in capsys.readouterr().out.splitlines():
        m = LINE.match(line)
        assert m, f"not a ratio line: {line!r}"
        value = float(m.group("ratio"))  # 'nan', 'inf' parse too: checked next
        assert math.isfinite(value) and value > 0, line
        out[m.group("name")] = value
    return out


def _ok(results, name, capsys):
    assert [r.name for r in results][0] == name
    r = results[0]
    assert not r.failed
    printed = printed_ratios(results[:1], capsys)
    assert printed == {name: pytest.approx(r.ratio, abs=0.005)}
    return r


def _gated(backbone, seed=0):
    model = tiny_model(backbone, seed=seed, method="gated", learn_temperature=True, num_prompts=3, gate_init=1.0)
    with torch.no_grad():  # gates and temperatures away from their initial values, so both matter
        model.gate_logits.copy_(torch.linspace(-2.0, 2.0, model.depth - 1))
        model.temperature.copy_(torch.linspace(0.5, 2.0, model.depth))
    return model


@pytest.mark.parametrize("backbone", ["test_mae_tiny", "test_moco_tiny"])  # mean and CLS pooling
def test_naive_reference_equals_gapt_forward(backbone, images):
    model = _gated(backbone)
    naive = NaiveGatedViT.from_gapt(model)
    assert not naive.training  # follows the model's mode (tiny_model is in eval mode)
    assert check_equal(model, naive, images, atol=1e-5) <= 1e-5
    with torch.no_grad():
        assert torch.allclose(model(images), naive(images), atol=1e-5, rtol=0)


def test_naive_reference_trains_like_gapt(images):
    """Train mode (same prompt-dropout masks from the same seed): same loss and tuned gradients."""
    model = _gated(TINY, seed=1)
    naive = NaiveGatedViT.from_gapt(model)
    model.train()
    naive.train()
    labels = torch.tensor([0, 1, 2])
    grads = []
    for m in (model, naive):
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(m(images), labels)
        loss.backward()
        grads.append({"loss": loss.detach(),
                      "prompts": (model.prompt_embeddings if m is model else naive.prompts).grad,
                      "gates": m.gate_logits.grad, "temperature": m.temperature.grad,
                      "head": m.head.weight.grad})
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4), key


def test_naive_reference_rejects_other_methods():
    with pytest.raises(ValueError, match="gated"):
        NaiveGatedViT.from_gapt(tiny_model(TINY, method="vpt-deep"))


def test_check_equal_raises_on_different_models(images):
    model = _gated(TINY)
    naive = NaiveGatedViT.from_gapt(model)
    with torch.no_grad():
        naive.blocks[0].fc1.weight.add_(0.5)
    with pytest.raises(AssertionError, match="differs"):
        check_equal(model, naive, images)


def test_paired_and_result_line():
    calls = []
    t = paired(lambda: calls.append("b"), lambda: calls.append("c"), repeats=3, clock=Clock("wall"), warmup=1)
    assert calls == ["b", "c", "b", "c", "c", "b", "b", "c"]  # warm-up, then alternating order
    assert t.pairs == 3 and t.low <= t.ratio <= t.high
    assert Result("x", 1.234, "a", target=1.15).line() == "x: 1.23x (a; target >= 1.15x met)"
    assert Result("x", 1.0, "a", target=1.15).line() == "x: 1.00x (a; target >= 1.15x NOT met)"
    assert Result("x", None, "no CUDA device").line() == "x: skipped (no CUDA device)"


def test_train_step(capsys):
    results = train_step.run(backbone=TINY, batch=2, num_prompts=3, repeats=1, device=CPU)
    r = _ok(results, "train_step", capsys)
    assert r.target == train_step.CPU_TARGET and r.extra["logit_diff"] <= 1e-4
    cuda = results[1]
    assert cuda.name == "train_step_cuda"
    if not torch.cuda.is_available():
        assert cuda.line() == "train_step_cuda: skipped (no CUDA device)"


def test_accelerated_train_step_path_runs_on_cpu(capsys):
    """The train_step_cuda code (bf16 autocast + torch.compile vs fp32 naive) end to end, on CPU: it must
    compile (no silent eager fallback) and time both steps; the CPU ratio itself means nothing."""
    r = train_step.run_accelerated(CPU, backbone=TINY, batch=2, num_prompts=3, repeats=1)
    assert r.name == "train_step_cpu" and r.extra["compiled"], r.line()
    assert printed_ratios([r], capsys) == {"train_step_cpu": pytest.approx(r.ratio, abs=0.005)}
    assert "bf16 autocast + SDPA + torch.compile" in r.detail


def test_profile_summary():
    text = train_step.profile_cpu(backbone=TINY, batch=2, num_prompts=3, rows=3)
    assert "== gapt" in text and "== naive" in text and "linear layers" in text
    assert "attention core" in train_step.attention_core_times(batch=1, tokens=10, heads=2, head_dim=4, repeats=1)


@pytest.mark.parametrize("bf16", [False, True])  # bf16: the CUDA path's autocast, run on CPU
def test_eval_throughput(bf16, capsys):
    r = _ok(eval_throughput.run(backbone=TINY, batch=2, num_prompts=3, repeats=1, device=CPU, bf16=bf16),
            "eval_throughput", capsys)
    assert ("bf16 autocast" in r.detail) == bf16


@pytest.mark.parametrize("bf16", [False, True])  # bf16: the CUDA default's autocast, run on CPU
def test_frozen_cache(bf16, capsys):
    results = frozen_cache.run(backbone=TINY, insert_at_block=[3, 2], num_prompts=2, num_images=4, batch=2,
                               repeats=1, device=CPU, bf16=bf16)
    r = _ok(results, "frozen_cache", capsys)
    assert r.target == pytest.approx(4 / (4 - 3 + 1) * 0.8)
    assert results[1].name == "frozen_cache_k2" and results[1].target == pytest.approx(4 / (4 - 2 + 1) * 0.8)
    assert ("bf16 autocast" in r.detail) == bf16
    assert set(printed_ratios(results, capsys)) == {"frozen_cache", "frozen_cache_k2"}


def test_frozen_cache_check_compares_at_one_precision():
    """A bf16 cache checked against an fp32 forward fails the 1e-3 check on bf16's rounding alone (the old
    check, which raised on CUDA); the same cache against a bf16-autocast forward passes (the check now)."""
    from gapt.engine.trainer import precompute_frozen
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    model = tiny_model(TINY, method="vpt-at-block", insert_at_block=3, num_prompts=2).eval()
    with torch.no_grad():  # weights of a trained size: logits of a few units, so relative rounding shows
        for p in model.backbone.parameters():
            p.mul_(4.0)
        model.head.weight.normal_(0, 1.0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(images, torch.zeros(4, dtype=torch.long))
    cache = precompute_frozen(model, data, 4, CPU, torch.bfloat16, "cache").tensors[0]
    assert frozen_cache.check_cache(model, images, cache, CPU, torch.bfloat16) <= 1e-6
    with pytest.raises(AssertionError, match="differs"):
        frozen_cache.check_cache(model, images, cache, CPU, None)  # bf16 cache vs fp32 forward
    fp32_cache = precompute_frozen(model, data, 4, CPU, None, "cache").tensors[0]
    assert frozen_cache.check_cache(model, images, fp32_cache, CPU, None) <= 1e-4


def test_linear_probe_cache(capsys):
    _ok(linear_probe_cache.run(backbone=TINY, epochs=2, num_images=4, batch=2, repeats=1, device=CPU),
        "linear_probe_cache", capsys)


def test_vtab_data_path(tmp_path, capsys):
    task = vtab_data_path.make_vtab_fixture(str(tmp_path), num_images=10, size=(40, 30))
    lines = (Path(task) / "train800.txt").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("images/train/000000.jpg ")
    assert (Path(task) / "images" / "test" / "000009.jpg").is_file()
    r = _ok(vtab_data_path.run(num_images=10, image_size=32, size=(64, 48), batch=4, repeats=1), "vtab_data_path",
            capsys)
    assert r.target == vtab_data_path.TARGET


def test_fgvc_data_path(capsys):
    _ok(fgvc_data_path.run(num_images=8, image_size=32, batch=4, repeats=1), "fgvc_data_path", capsys)


def test_memory_tracker_counts_live_storages():
    with memory.LiveTensorBytes() as tracker:
        a = torch.empty(1000, dtype=torch.float32)   # 4000 bytes
        view = a[10:]                                # a view: nothing new
        b = a * 2                                    # 4000 more
        del a, view, b
    assert tracker.peak == 8000 and tracker.live == 0
    a, b, err = memory.fit_line([(1, 10), (2, 13), (4, 19)])
    assert (a, b) == pytest.approx((7, 3)) and err == pytest.approx(0, abs=1e-12)


def test_memory(capsys):
    r = _ok(memory.run(backbone=TINY, num_prompts=3, batches=(1, 2), budget_gb=0.05, device=CPU), "memory", capsys)
    assert r.extra["plain"]["per_image"] > r.extra["checkpointing"]["per_image"] > 0


def test_protocol(capsys):
    _ok(protocol.run(epochs=1, num_samples=20, batch=32, repeats=1, device=CPU), "protocol", capsys)


def test_demo_workers(capsys):
    _ok(demo_workers.run(runs=2, epochs=1, num_samples=16, workers=2, device=CPU), "demo_workers", capsys)


def test_run_all_rejects_unknown_names():
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark"])
