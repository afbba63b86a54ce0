"""Shared bits for benchmarks: machine facts and rewriting one section of docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"


def environment() -> dict[str, Any]:
    from importlib import metadata

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "pillow", "tlreg", "tlreg-efficientnet-lite"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": _gpu(), "versions": versions, "commit": git("rev-parse", "HEAD") or None,
        # what the benchmarks write themselves does not count as a change to what ran
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                          ":!bench/results", ":!docs/benchmarks.md")),
        # glibc tuning in the environment changes what every run's allocator does
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def machine() -> str:
    """CPU model, cores, and the versions that matter, for a benchmark's header line."""
    env = environment()
    v = env["versions"]
    return (f"{env['cpu']}, {env['cores']} cores; Python {v['python']}, torch {v['torch']}, "
            f"timm {v['timm']}, tlreg {v['tlreg']}, commit {(env['commit'] or 'unknown')[:7]}"
            + (" with uncommitted changes" if env["dirty"] else ""))


def write_section(name: str, body: str) -> None:
    """Replace `<!-- bench:NAME -->...<!-- /bench:NAME -->` in docs/benchmarks.md (or append)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    tmp = BENCHMARKS_MD.with_name(f".{BENCHMARKS_MD.name}.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)  # never a half-written page
