"""The package's layers, checked by import-linter's contracts in pyproject.toml.

The contracts pass on the tree as it is, and fail on a copy of it with one forbidden import
added, so the check cannot be vacuous.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="import-linter is in the test extra")
tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The package under `root` must be the one imported: put it first on the path.
    env = dict(os.environ, PYTHONPATH=str(root))
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(ROOT / "tlreg", dst / "tlreg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_contracts_hold_on_the_tree() -> None:
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("tlreg/models/heads.py", "from tlreg.engine import trainer", "Layers only look down"),
    ("tlreg/plugins.py", "from tlreg import errors", "plugins imports nothing of tlreg"),
    ("tlreg/engine/loop.py", "from tlreg.engine import trainer", "engine layers only look"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str,
                                              broken: str) -> None:
    repo = copy_tree(tmp_path)
    path = repo / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "  # noqa\n" + rest)
    proc = lint_imports(repo)
    assert proc.returncode != 0
    assert f"{broken}" in proc.stdout and "BROKEN" in proc.stdout


def test_plugins_contract_names_every_other_module() -> None:
    """`plugins imports nothing of tlreg` lists the modules: a new one must join the list."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    forbidden = next(c for c in config["contracts"] if c["name"].startswith("plugins"))
    listed = set(forbidden["forbidden_modules"])
    top = {f"tlreg.{p.stem if p.is_file() else p.name}" for p in (ROOT / "tlreg").iterdir()
           if (p.suffix == ".py" and p.stem not in ("__init__", "__main__", "plugins"))
           or (p.is_dir() and (p / "__init__.py").is_file())}
    assert top - listed == set(), "add these to the plugins contract in pyproject.toml"
