"""Shared bits for benchmarks: machine facts and rewriting one section of docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"


def machine() -> str:
    """CPU model, cores, and the versions that matter, for a benchmark's header line."""
    import os

    import timm
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    from tlreg import __version__

    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}, tlreg {__version__}, "
            f"commit {commit}")


def write_section(name: str, body: str) -> None:
    """Replace `<!-- bench:NAME -->...<!-- /bench:NAME -->` in docs/benchmarks.md (or append)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    BENCHMARKS_MD.write_text(text)
