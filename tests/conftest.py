"""Shared fixtures: the shared data folder, and throwaway plugin distributions on sys.path.

A plugin distribution here is what pip would leave in site-packages: a module plus a
`<name>-<version>.dist-info` folder with `METADATA` and `entry_points.txt`. Putting its folder
first on `sys.path` (for this process) and on `PYTHONPATH` (for subprocesses) is all
`importlib.metadata` needs to discover it, exactly as it discovers an installed package.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repository (read-only data); skip when this checkout lacks it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not found (expected beside the repository)")
    return SHARED


@dataclass(frozen=True)
class PluginDist:
    """One plugin distribution written by `plugin_site`."""

    name: str  # distribution name as written in METADATA (not normalised)
    version: str
    modules: tuple[str, ...]


class PluginSite:
    """A folder of plugin distributions, first on sys.path and PYTHONPATH while a test runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dists: list[PluginDist] = []

    def add(self, name: str, entry_points: Mapping[str, Mapping[str, str]],
            modules: Mapping[str, str], version: str = "0.1.0",
            requires: tuple[str, ...] = ()) -> PluginDist:
        """Write `modules` ({module name: source}) and a dist-info registering `entry_points`.

        `entry_points` maps a group ('tlreg.backbones') to {entry name: 'module:attr'}.
        """
        for mod, source in modules.items():
            (self.root / f"{mod}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            f"Summary: tlreg test plugin\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        lines = []
        for group, entries in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{k} = {v}" for k, v in entries.items()]
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines))
        (info / "RECORD").write_text("")
        dist = PluginDist(name, version, tuple(modules))
        self.dists.append(dist)
        _forget_plugins()
        return dist

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that must see these plugins."""
        env = dict(os.environ, COLUMNS="200")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.root), *filter(None, [env.get("PYTHONPATH")])])
        env.update(extra)
        return env


def _forget_plugins() -> None:
    from tlreg.registry import clear_cache

    clear_cache()


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSite]:
    """A fresh plugin folder on sys.path; on exit the folder, its modules and caches are gone."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    # Clear both knobs so a developer's own environment cannot change what tests see.
    monkeypatch.delenv("TLREG_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("TLREG_DISABLE_PLUGINS", raising=False)
    site = PluginSite(root)
    yield site
    for dist in site.dists:
        for mod in dist.modules:
            sys.modules.pop(mod, None)
    # monkeypatch restores sys.path after this fixture; clear caches once it has.
    monkeypatch.undo()
    _forget_plugins()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run `tlreg ARGV` in this process: returns (exit code, stdout, stderr)."""
    from tlreg.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping or truncation in asserts

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        out, err = capsys.readouterr()
        code = exc.value.code
        return (code if isinstance(code, int) else (0 if code is None else 1)), out, err

    return run


@pytest.fixture(scope="session")
def tlreg_cmd() -> list[str]:
    """The installed `tlreg` console script of the running interpreter's environment."""
    import shutil

    bindir = Path(sys.executable).parent
    for candidate in (bindir / "tlreg", bindir / "tlreg.exe"):
        if candidate.is_file():
            return [str(candidate)]
    found = shutil.which("tlreg")
    if found is None:
        pytest.fail("the `tlreg` console script is not installed (pip install -e .)")
    return [found]


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HF home: no developer token, cache or offline setting leaks in or out."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    # huggingface_hub reads these at import time, so the variables above alone come too late.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home / "hub"
