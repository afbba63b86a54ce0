"""`python -m bench [--quick] [NAME ...]`: run the benchmark modules found in bench/.

A module takes part if it defines `run(quick: bool)`; modules whose names start with `_` are
helpers. Every selected benchmark runs even if an earlier one fails; the exit code is non-zero
if any failed, so CI notices a broken benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the modules in bench/ (helpers excluded), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)])
                  if not m.name.startswith("_") and not m.ispkg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, in seconds (for CI); see each module for what it skips")
    args = parser.parse_args(argv)
    available = discover()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; "
                     f"available: {', '.join(available)}")
    failed: list[str] = []
    ran = 0
    for name in args.names or available:
        module = importlib.import_module(f"bench.{name}")
        run = getattr(module, "run", None)
        if not callable(run):
            print(f"== bench.{name}: no run(quick) (skipped)", flush=True)
            continue
        print(f"== bench.{name}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            run(quick=args.quick)
        except SystemExit as exc:  # a module's own CLI may exit; only a failure counts
            if exc.code not in (0, None):
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        ran += 1
        print(f"== bench.{name}: {'FAILED' if name in failed else 'done'} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"bench: {ran - len(failed)} ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
