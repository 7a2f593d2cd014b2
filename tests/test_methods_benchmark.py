"""benchmarks/methods.py at tiny size: a line per method (merged LoRA / SSF included) whose printed ratios are
finite positive numbers (no assertion on time)."""
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import methods  # noqa: E402
from benchmarks._common import print_results  # noqa: E402

ROWS = ["linear", "vpt-shallow", "vpt-deep", "gated+temperature", "lora", "lora q,v", "adaptformer", "bitfit", "ssf",
        "full", "merged lora", "merged ssf"]


def test_every_method_prints_finite_ratios(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = methods.run(quick=True, device=torch.device("cpu"), backbone="test_mae_tiny", batch=2, repeats=1)
    finally:
        torch.set_num_threads(threads)
    print_results(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.match(r"methods\[(.+), micro\]: ", line).group(1) for line in lines] == ROWS
    for line in lines:
        ratios = [float(x) for x in re.findall(r"(\S+)x[ (']", line)]
        assert len(ratios) >= (5 if "inference only" in line else 7), line
        assert all(math.isfinite(r) and r > 0 for r in ratios), line
    by_row = {r.name: r.extra for r in results}
    assert by_row["methods[linear, micro]"]["eval_vs_linear"] == 1.0
    assert by_row["methods[vpt-deep, micro]"]["train_vs_vpt_deep"] == 1.0
