"""The import graph is the layer diagram (DESIGN.md): checked with import-linter's contracts from
pyproject.toml, here and by `lint-imports`. Imports inside functions count as imports."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="pip install gapt[test] (import-linter)")

ROOT = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}, timeout=120)


def copy_package(dest: Path) -> Path:
    shutil.copytree(ROOT / "gapt", dest / "gapt", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_layers_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    # what the layers forbid, written as the code base once had it: inside a function
    ("engine/trainer.py", "from ..report import tables", "gapt.engine.trainer -> gapt.report.tables"),
    ("seg/commands.py", "from ..cli import main", "gapt.seg.commands -> gapt.cli"),
    ("model/build.py", "from ..data import build_datasets", "gapt.model.build -> gapt.data"),
    ("sweep/run.py", "from ..seg import metrics", "gapt.sweep.run -> gapt.seg.metrics"),
    ("paper/plans.py", "from ..analysis import gates", "gapt.paper.plans -> gapt.analysis.gates"),
    ("report/tables.py", "from ..analysis import runs", "gapt.report.tables -> gapt.analysis.runs"),
    ("method.py", "from .model import build_model", "gapt.method -> gapt.model"),
    ("tasks.py", "from .sweep import run", "gapt.tasks -> gapt.sweep.run"),
])
def test_an_upward_import_is_caught(tmp_path, module, line, broken):
    root = copy_package(tmp_path)
    path = root / "gapt" / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {line}\n")
    done = lint(root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout, done.stdout


def import_cycles(package: str = "gapt") -> list:
    """Strongly connected components of more than one module in ``package``'s import graph
    (grimp, import-linter's own graph builder; imports inside functions count)."""
    import grimp
    graph = grimp.build_graph(package, cache_dir=None)
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle():
    assert import_cycles() == []


def test_a_planted_cycle_is_found(tmp_path, monkeypatch):
    root = copy_package(tmp_path)
    path = root / "gapt" / "analysis" / "plotting.py"  # gates imports plotting; plant the way back
    path.write_text(path.read_text() + "\n\ndef _late():\n    from .gates import analyze_gates\n")
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "gapt" or m.startswith("gapt.")]:
        monkeypatch.delitem(sys.modules, name)
    assert any({"gapt.analysis.gates", "gapt.analysis.plotting"} <= set(c) for c in import_cycles())


def test_no_module_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "gapt").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
