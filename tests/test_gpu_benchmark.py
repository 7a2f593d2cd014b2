"""benchmarks/gpu.py: its --smoke run (CPU, tiny ViTs) writes every section, and its MFU FLOP count
agrees with an independent count. No GPU needed; nothing here asserts on time."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

from gapt.model import BackboneSpec  # noqa: E402


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# -- the smoke run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpusmoke")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would take precedence over --out
    # a generous budget: on a loaded machine no section may be skipped for time here
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out),
                           "--budget-s", "3000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / gpu.JSON_NAME).read_text())
    return doc, (out / gpu.MD_NAME).read_text(), proc.stdout


def test_smoke_has_every_section(smoke):
    doc, _, stdout = smoke
    sections = doc["sections"]
    assert list(sections) == list(gpu.SECTIONS)
    for key, rec in sections.items():
        expected = "skipped" if key == "ddp" else "ok"
        assert rec["status"] == expected, (key, rec.get("reason") or rec.get("error"))
        assert f"] {key}: " in stdout  # a progress line per section
    assert "two GPUs" in sections["ddp"]["reason"]
    env = sections["environment"]
    assert env["torch"] == torch.__version__ and env["timm"] and env["date_utc"] and env["device_name"]
    assert env["peak_flops"].startswith("unknown")  # CPU: MFU omitted
    assert doc["smoke"] is True and doc["budget"]["elapsed_s"] > 0


def _check_train_cells(cells, methods=3, batches=2, precisions=3):
    assert len(cells) == methods * batches * precisions
    for c in cells:
        assert c["status"] == "ok", c
        for k in ("step_ms", "images_per_s", "flops_per_step", "tflops_per_s"):
            assert _pos(c[k]), (k, c)
        assert c["flops_per_step"] == c["flops_per_image"] * c["batch"]
        assert c["images_per_s"] == pytest.approx(c["batch"] / (c["step_ms"] / 1e3))
        assert "mfu" not in c  # unknown peak on CPU


def test_smoke_train_and_eval_numbers(smoke):
    s = smoke[0]["sections"]
    _check_train_cells(s["train_step"]["cells"])
    _check_train_cells(s["train_step_vitl16"]["cells"])
    assert {c["precision"] for c in s["train_step"]["cells"]} == {"fp32", "tf32", "bf16"}
    compiled = s["train_step_compile"]["cells"]
    assert len(compiled) == 2 * 3 * 2  # backbones x methods x batches
    first, rest = compiled[0], compiled[1:]
    assert first["status"] == "ok" and first["precision"] == "bf16+compile" and first["graphs"] >= 1
    assert _pos(first["images_per_s"]) and first["compile_s"] >= 0
    assert all(c["status"] == "skipped" and "--compile-cells 1" in c["reason"] for c in rest)
    for key in ("eval_throughput", "eval_throughput_vitl16"):
        cells = s[key]["cells"]
        assert {c["precision"] for c in cells} == {"bf16", "fp32"}
        assert all(c["status"] == "ok" and _pos(c["images_per_s"]) for c in cells)
    rows = s["flops"]["per_image"]
    assert len(rows) == 6 and all(_pos(r["step"]) and r["step"] == r["forward"] + r["backward"] for r in rows)


def test_smoke_bf16_vs_fp32(smoke):
    b = smoke[0]["sections"]["bf16_vs_fp32"]
    assert len(b["loss_fp32"]) == len(b["loss_bf16"]) == b["steps"]
    assert all(_pos(v) for v in b["loss_fp32"] + b["loss_bf16"])
    assert b["loss_final"]["fp32"] < b["loss_first"]["fp32"]  # the run learns
    assert math.isfinite(b["loss_max_abs_diff"]) and b["loss_max_abs_diff"] >= 0
    assert _pos(b["logits"]["max_abs_diff"])  # bf16 does change the logits, and by a finite amount
    assert b["logits"]["relative_max_diff"] < 0.1 and 0 <= b["logits"]["argmax_agreement"] <= 1


def test_smoke_caches_segmentation_and_max_batch(smoke):
    s = smoke[0]["sections"]
    fc = s["frozen_cache"]
    for k in ("ratio", "val_ratio", "ideal", "build_s", "epoch_s_all_blocks", "epoch_s_cached"):
        assert _pos(fc[k]), k
    assert fc["logit_diff_same_autocast"] <= 1e-3
    assert _pos(s["linear_probe_cache"]["ratio"]) and s["linear_probe_cache"]["line"].startswith("linear_probe_cache: ")

    seg = s["segmentation"]
    assert [r["precision"] for r in seg["train"]] == ["bf16", "fp32"]
    for row in seg["train"]:
        assert row["status"] == "ok" and _pos(row["images_per_s"]) and _pos(row["loss"]) and row["batch"] >= 1
    assert seg["eval"]["forward_passes"] > 2 * len(seg["eval"]["ratios"])  # several windows per scale
    assert all(r["status"] == "ok" and _pos(r["seconds"]) for r in seg["eval"]["runs"])

    for key, n in (("max_batch", 4), ("max_batch_vitl16", 2)):
        searches = s[key]["searches"]
        assert len(searches) == n
        for x in searches:
            assert x["status"] == "ok" and x["largest_fit"] >= 1 and _pos(x["per_image_bytes"]), x
            assert x["smallest_fail"] is None or x["smallest_fail"] > x["largest_fit"]
        by = {(x["precision"], x["grad_checkpointing"]): x for x in searches}
        for precision in {p for p, _ in by}:  # checkpointing keeps fewer activations per image
            assert by[precision, True]["per_image_bytes"] < by[precision, False]["per_image_bytes"]
            assert by[precision, True]["largest_fit"] >= by[precision, False]["largest_fit"]


def test_smoke_markdown_mentions_every_section(smoke):
    md = smoke[1]
    assert md.startswith("# GPU figures")
    for key in gpu.SECTIONS:
        assert key in md, key
    assert "| train_step | " in md and "bf16+compile" in md and "## bf16_vs_fp32" in md


# -- the FLOP formula against torch's FLOP counter ---------------------------------------------------
# FlopCounterMode counts 2 FLOPs per multiply-add of every matmul / convolution aten op, which is
# exactly what vit_flops counts (softmax, LayerNorm, GELU, the gate mix are left out by both). With
# the math SDPA backend attention is two plain bmm's forward and four backward, so there is no
# flash-attention recompute either: the two counts must agree exactly, and the tolerance is only
# float rounding of the comparison (1e-9 relative). A missed or double-counted matmul anywhere (say
# the backward of a block that needs none, or the head's input gradient under linear probing) is
# off by at least 2*D*C per image, far more than that.
SPECS = {
    "mlp4": BackboneSpec("flops_tiny", dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0,
                                             qkv_bias=True), "mean", "mae", image_size=32),
    "mlp2": BackboneSpec("flops_tiny2", dict(patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0,
                                              qkv_bias=True), "cls", "mocov3", image_size=32),
}
METHOD_CASES = [("linear", {}), ("vpt-shallow", {}), ("vpt-deep", {}), ("gated", {"learn_temperature": True}),
                ("vpt-at-block", {"insert_at_block": 2})]


def _counted(model, batch, image_size, device="cpu"):
    model.train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = model(x)
        with FlopCounterMode(display=False) as bwd:
            out.float().sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("method,kw", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_flop_formula_equals_flop_counter(spec, method, kw):
    model = gpu.build(SPECS[spec], method=method, num_prompts=5, num_classes=7, **kw)
    forward, backward = _counted(model, batch=3, image_size=32)
    f = gpu.vit_flops(gpu.dims_of(model))
    assert f["forward"] * 3 == pytest.approx(forward, rel=1e-9)
    assert f["backward"] * 3 == pytest.approx(backward, rel=1e-9)
    assert f["tokens"] == 1 + 16 + (0 if method == "linear" else 5)


@pytest.mark.parametrize("backbone", ["mae_vitb16", "mae_vitl16"])
def test_flop_formula_at_full_size(backbone):
    """The benchmarked models themselves (built on the meta device: no memory, no compute): gated +
    temperature with 100 prompts against FlopCounterMode, and the linear probe's forward against the
    published 17.6 / 61.6 GMACs of ViT-B/16 / ViT-L/16 at 224 px (timm's model tables)."""
    with torch.device("meta"):
        model = gpu.build(backbone, method="gated", learn_temperature=True, num_prompts=100, num_classes=100)
        linear = gpu.build(backbone, method="linear", num_classes=1000)
    forward, backward = _counted(model, batch=2, image_size=224, device="meta")
    f = gpu.vit_flops(gpu.dims_of(model))
    assert f["tokens"] == 297
    assert (2 * f["forward"], 2 * f["backward"]) == (forward, backward)
    gmacs = gpu.vit_flops(gpu.dims_of(linear))["forward"] / 2e9
    assert gmacs == pytest.approx({"mae_vitb16": 17.6, "mae_vitl16": 61.6}[backbone], rel=0.005)


def test_flop_formula_written_out():
    d, n, h = 768, 297, 3072
    assert gpu.block_forward_flops(n, d, h) == 24 * n * d * d + 4 * n * n * d
    assert gpu.block_backward_flops(n, d, h) == 24 * n * d * d + 8 * n * n * d
    with pytest.raises(ValueError, match="full"):
        gpu.vit_flops(gpu.VitDims(12, 768, 3072, 196, 768, 1, 0, 10, "full"))


# -- pieces --------------------------------------------------------------------------------------
def test_peak_table():
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3")["entry"] == "H100 SXM"
    assert gpu.peak_flops("NVIDIA H100 PCIe")["entry"] == "H100 PCIe"
    assert gpu.peak_flops("NVIDIA H100 NVL")["entry"] == "H100 NVL"
    assert gpu.peak_flops("NVIDIA H200")["entry"] == "H200 SXM"
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB")["bf16"] == pytest.approx(312e12)
    assert gpu.peak_flops("cpu") is None and gpu.peak_flops("NVIDIA GeForce RTX 4090") is None
    h100 = gpu.peak_flops("NVIDIA H100 80GB HBM3")
    assert h100["bf16"] > h100["tf32"] > h100["fp32"]
    assert [gpu.peak_key(p) for p in gpu.PRECISIONS] == ["fp32", "tf32", "bf16", "bf16"]


def _fake(limit, fixed=10_000, per=1_000):
    calls = []

    def probe(batch):
        calls.append(batch)
        return batch <= limit, (fixed + per * batch if batch <= limit else None)
    return probe, calls


def test_search_largest_uses_the_linear_prediction():
    probe, calls = _fake(1000)
    out = gpu.search_largest(probe, start=32, cap=4096, capacity=10_000 + 1_000 * 1000.5, max_probes=20,
                             deadline=float("inf"))
    lo, hi = out["largest_fit"], out["smallest_fail"]
    assert out["predicted"] == 1000 and lo <= 1000 < hi and hi - lo <= lo // 32  # the bracket: within 1/32
    assert calls[:4] == [32, 64, 970, 1030]  # two small probes, then 97% and 103% of the prediction
    assert len(calls) <= 5 and out["stop"] == "converged" and out["per_image_bytes"] == 1000


def test_search_largest_wrong_prediction_cap_and_limits():
    probe, calls = _fake(300)  # the capacity says 5000: the guess fails, bisection finds 300
    out = gpu.search_largest(probe, 32, 4096, 10_000 + 1_000 * 5000, 30, float("inf"))
    lo, hi = out["largest_fit"], out["smallest_fail"]
    assert lo <= 300 < hi and hi - lo <= max(1, lo // 32)
    probe, _ = _fake(10**9)  # everything fits: stops at the cap and says so
    out = gpu.search_largest(probe, 32, 512, None, 30, float("inf"))
    assert out["largest_fit"] == 512 and out["capped"] and out["smallest_fail"] is None
    probe, _ = _fake(3)  # even the start fails: halve, then bisect
    out = gpu.search_largest(probe, 32, 512, None, 30, float("inf"))
    assert (out["largest_fit"], out["smallest_fail"]) == (3, 4)
    probe, calls = _fake(10**9)
    out = gpu.search_largest(probe, 32, 10**6, None, 4, float("inf"))
    assert len(calls) == 4 and out["stop"] == "probe or time limit"


def test_precision_mode_sets_and_restores_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    with gpu.precision_mode("tf32") as amp:
        assert amp is None and torch.backends.cuda.matmul.allow_tf32
    with gpu.precision_mode("fp32") as amp:
        assert amp is None and not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    with gpu.precision_mode("bf16+compile") as amp:
        assert amp is torch.bfloat16
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_output_dir_prefers_OUT(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.output_dir("elsewhere") == tmp_path
    monkeypatch.delenv("OUT")
    assert gpu.output_dir("elsewhere") == Path("elsewhere")
    assert gpu.output_dir(None) == Path("runs/gpu")


def test_runner_records_failures_and_budget_skips(tmp_path):
    """A failing section is recorded with its error and the next one still runs; once the budget is spent
    sections are skipped with the reason; both files are rewritten after every section."""
    r = gpu.Runner(gpu.smoke_plan(), torch.device("cpu"), tmp_path, budget_s=1000.0,
                   selected=[k for k in gpu.SECTIONS if k != "ddp"])
    r.section("frozen_cache", lambda r: {"x": 1 / 0})
    r.section("linear_probe_cache", lambda r: {"ratio": 2.0, "line": "linear_probe_cache: 2.00x (test)"})
    r.section("ddp", lambda r: {})
    r.budget_s = 0.0
    r.section("segmentation", lambda r: {}, min_s=1.0)
    doc = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    s = doc["sections"]
    assert s["frozen_cache"]["status"] == "failed" and "ZeroDivisionError" in s["frozen_cache"]["error"]
    assert s["linear_probe_cache"]["status"] == "ok" and s["linear_probe_cache"]["ratio"] == 2.0
    assert s["ddp"] == {"status": "skipped", "reason": "not selected (--only / --skip)"}
    assert s["segmentation"]["status"] == "skipped" and s["segmentation"]["reason"].startswith("time budget")
    assert s["max_batch"]["status"] == "pending"  # not reached: a cut-short run still names it
    md = (tmp_path / gpu.MD_NAME).read_text()
    assert "| frozen_cache | failed |" in md and "ZeroDivisionError" in md and "linear_probe_cache: 2.00x" in md
