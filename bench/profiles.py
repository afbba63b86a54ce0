"""Where the time goes: cProfile summaries of the runs behind the targets `bench.perf` misses.

Each case runs one command in a fresh process under `python -m cProfile` and reports tlreg's own
functions by cumulative time (the share of the process each one and everything it calls takes),
plus the first `import timm` (which brings torch and torchvision). cProfile adds overhead to
Python-heavy code, so the shares matter more than the seconds.

    python -m bench.profiles            # rewrites the `<!-- bench:profiles -->` section
    python -m bench.profiles --quick    # a tiny model on 16 images; prints only
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import HYMENOPTERA, ROOT, machine, write_section

SECTION = "profiles"
WRAPPERS = {"<module>", "main", "train", "fit", "_run", "run", "__call__", "invoke"}


def cases(data: Path, quick: bool) -> dict[str, list[str]]:
    """name -> tlreg arguments (an --out folder is appended)."""
    if quick:
        return {"feature-extract, timm:test_resnet, 2 epochs": [
            "train", str(data), "--backbone", "timm:test_resnet", "--no-pretrained",
            "--img-size", "32", "--epochs", "2", "--quiet"]}
    return {"figure 1: feature-extract, resnet18 (random init), 10 epochs, batch 32": [
        "train", str(data), "--backbone", "resnet18", "--no-pretrained", "--policy",
        "feature-extract", "--epochs", "10", "--batch-size", "32", "--quiet"]}


def profile(args: list[str], work: Path) -> tuple[float, pstats.Stats]:
    """Wall seconds of the whole process and its cProfile statistics."""
    prof = work / "run.prof"
    env = dict(os.environ, TLREG_CACHE_DIR=str(work / "cache"))  # a cold feature cache
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "tlreg", *args,
                    "--out", str(work / "run")], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, pstats.Stats(str(prof))


def summarise(stats: pstats.Stats, top: int) -> list[tuple[str, float]]:
    """(label, cumulative seconds): the first `import timm`, then tlreg's costliest functions.

    A function called only by the row above it, taking nearly all of that row's time, joins
    that row (`outer > inner`): a wrapper adds nothing to read.
    """
    table = stats.stats  # type: ignore[attr-defined]
    rows: list[tuple[tuple[str, int, str], str, float]] = []
    timm_import = 0.0
    for key, (_, _, _, cum, _) in table.items():
        file, _, name = key
        if file.endswith(os.path.join("timm", "__init__.py")) and name == "<module>":
            timm_import = max(timm_import, cum)
        elif f"{os.sep}tlreg{os.sep}" in file and name not in WRAPPERS:
            module = file.rsplit(f"{os.sep}tlreg{os.sep}", 1)[1].removesuffix(".py")
            rows.append((key, f"`tlreg/{module}.py` `{name}`", cum))
    rows.sort(key=lambda r: -r[2])
    kept: list[tuple[tuple[str, int, str], str, float]] = []
    for key, label, cum in rows:
        if kept and set(table[key][4]) == {kept[-1][0]} and cum > 0.98 * kept[-1][2]:
            kept[-1] = (key, f"{kept[-1][1]} > {label}", kept[-1][2])
        else:
            kept.append((key, label, cum))
    cum_of = {key[2]: cum for key, _, cum in rows}
    derived = []
    if "compute" in cum_of and "batches" in cum_of:
        derived.append(("backbone forward: `compute` minus its `batches` (decode, transform)",
                        cum_of["compute"] - cum_of["batches"]))
    return [("first `import timm` (torch, torchvision)", timm_import), *derived,
            *((label, cum) for _, label, cum in kept[:top])]


def run(quick: bool = False) -> None:
    data = HYMENOPTERA
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            from bench.perf import _quick_data

            data = _quick_data(Path(tmp) / "data")
        for name, args in cases(data, quick).items():
            work = Path(tempfile.mkdtemp(dir=tmp))
            wall, stats = profile(args, work)
            lines += [f"#### {name}", "",
                      f"`tlreg {' '.join(args).replace(str(data), 'DATA')}`: {wall:.1f} s "
                      f"under cProfile (cProfile's own total: {stats.total_tt:.1f} s).", "",
                      "| function (and what it calls) | cumulative s | share |",
                      "| --- | ---: | ---: |"]
            lines += [f"| {label} | {cum:.2f} | {cum / stats.total_tt:.0%} |"
                      for label, cum in summarise(stats, 12 if not quick else 5)]
            lines.append("")
    body = "\n".join([
        "## Profiles: where the time goes", "",
        f"`python -m bench.profiles` on {machine()}. Each run is a fresh process with a cold "
        "feature cache under `python -m cProfile`; rows nest (a function's time includes what "
        "it calls).", "", *lines])
    print(body)
    if not quick:
        write_section(SECTION, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profiles", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model; print, do not write")
    run(quick=p.parse_args(argv).quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
