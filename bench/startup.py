"""Start-up time of the CLI: `tlreg --help` and `tlreg plugins` in fresh processes.

Baselines, measured in the same run: `python -c pass` (the interpreter alone) and
`python -c "import torch, timm"` (what a CLI that imports its stack eagerly would pay before
doing anything). Commands run round-robin (A B C D A B C D ...) after one warm-up round that
fills the OS file cache, so background load hits every command alike; the table gives the
median and the fastest of N runs.

    python -m bench.startup [--quick] [--runs N]   # --quick: 3 runs, prints only

A full run rewrites the `<!-- bench:startup -->` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SECTION = "startup"
TARGET_S = 0.5  # issue 2: "well under half a second"


def tlreg_command() -> list[str]:
    """The installed console script beside this interpreter (what a user runs)."""
    for candidate in (Path(sys.executable).parent / "tlreg", shutil.which("tlreg")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    return [sys.executable, "-m", "tlreg"]


def commands() -> list[tuple[str, list[str]]]:
    py, tlreg = sys.executable, tlreg_command()
    return [
        ("python -c pass", [py, "-c", "pass"]),
        ('python -c "import torch, timm"', [py, "-c", "import torch, timm"]),
        ("tlreg --help", [*tlreg, "--help"]),
        ("tlreg plugins", [*tlreg, "plugins"]),
        ("tlreg backbones list", [*tlreg, "backbones", "list"]),
    ]


def _time(argv: list[str]) -> float:
    env = dict(os.environ, COLUMNS="100", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env, timeout=300)
    return time.perf_counter() - t0


def measure(runs: int) -> dict[str, list[float]]:
    cmds = commands()
    for _, argv in cmds:  # warm-up round: file cache, .pyc files
        _time(argv)
    times: dict[str, list[float]] = {name: [] for name, _ in cmds}
    for _ in range(runs):
        for name, argv in cmds:
            times[name].append(_time(argv))
    return times


def render(times: dict[str, list[float]], runs: int) -> str:
    from bench._report import machine

    base = statistics.median(times["python -c pass"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## CLI start-up",
        "",
        f"`python -m bench.startup` on {machine()}; load average {load:.1f} at the end.",
        f"Each command ran {runs} times in a fresh process (round-robin, after a warm-up round);"
        " times are wall-clock seconds.",
        "",
        "| command | median s | fastest s | median above `python -c pass` |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        extra = "" if name == "python -c pass" else f"+{med - base:.3f}"
        lines.append(f"| `{name}` | {med:.3f} | {min(ts):.3f} | {extra} |")
    if load > (os.cpu_count() or 1):
        lines += ["", f"The machine was busy with other work (load {load:.1f} on "
                      f"{os.cpu_count()} cores): these times are upper bounds, and the fastest "
                      "run is closer to an idle machine's median."]
    worst = max(statistics.median(times[n]) for n in times if n.startswith("tlreg"))
    verdict = "met" if worst < TARGET_S else "NOT met"
    lines += ["", f"Target: every `tlreg` command above under {TARGET_S} s: {verdict} "
                  f"(slowest median {worst:.3f} s). None of them imports torch or timm "
                  "(tests/test_cli_registry.py checks it with `-X importtime`)."]
    return "\n".join(lines)


def run(quick: bool = False, runs: int | None = None) -> None:
    runs = runs or (3 if quick else 15)
    times = measure(runs)
    body = render(times, runs)
    print(body)
    if not quick:
        from bench._report import write_section

        write_section(SECTION, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs; print, write nothing")
    parser.add_argument("--runs", type=int, help="runs per command (default 15)")
    args = parser.parse_args(argv)
    run(args.quick, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
