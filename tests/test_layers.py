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
    ("engine/trainer.py", "from ..protocol import report", "gapt.engine.trainer -> gapt.protocol.report"),
    ("seg/commands.py", "from ..cli import main", "gapt.seg.commands -> gapt.cli"),
    ("model/build.py", "from ..data import build_datasets", "gapt.model.build -> gapt.data"),
    ("protocol/report.py", "from ..seg import metrics", "gapt.protocol.report -> gapt.seg.metrics"),
    ("method.py", "from .model import build_model", "gapt.method -> gapt.model"),
])
def test_an_upward_import_is_caught(tmp_path, module, line, broken):
    root = copy_package(tmp_path)
    path = root / "gapt" / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {line}\n")
    done = lint(root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout, done.stdout
