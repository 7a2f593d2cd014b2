"""benchmarks/prompt_methods.py at tiny size: a line per VFPT / E2VPT row with finite positive ratios against
VPT-deep at the same prompt count (no assertion on time)."""
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import prompt_methods  # noqa: E402
from benchmarks._common import print_results  # noqa: E402

ROWS = ["vpt-deep", "vfpt a=1", "vfpt a=0.5", "e2vpt", "e2vpt fixed masks", "e2vpt no masks", "e2vpt+temperature"]


def test_every_row_prints_finite_ratios(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = prompt_methods.run(quick=True, device=torch.device("cpu"), backbone="test_mae_tiny", batch=2,
                                     repeats=1)
    finally:
        torch.set_num_threads(threads)
    print_results(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.match(r"prompt_methods\[(.+), micro\]: ", line).group(1) for line in lines] == ROWS
    for line in lines:
        ratios = [float(x) for x in re.findall(r"(\S+)x[ (']", line)]
        assert len(ratios) >= 4, line
        assert all(math.isfinite(r) and r > 0 for r in ratios), line
    by_row = {r.name: r.extra for r in results}
    assert by_row["prompt_methods[vpt-deep, micro]"]["train_vs_vpt_deep"] == 1.0
    # the pruned run trains fewer tensors (its masks are frozen), the e2vpt rows more than vpt-deep (the kv prompts)
    tuned = {label: by_row[f"prompt_methods[{label}, micro]"]["tuned"] for label in ROWS}
    assert tuned["vfpt a=1"] == tuned["vpt-deep"] < tuned["e2vpt no masks"] == tuned["e2vpt fixed masks"] < tuned["e2vpt"]
