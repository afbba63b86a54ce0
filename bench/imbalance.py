"""Class imbalance: hymenoptera with 10 ants per bee, plain against `--class-weights auto`.

Training keeps every ant and a seeded tenth as many bees (a table of the photos' paths, so
nothing is copied); validation is the whole, balanced val split. For each seed both runs share
the subsample and the feature cache, in the same session, interleaved:

    python -m bench.imbalance [--seeds 3] [--finetune-seeds 1]

EfficientNet-Lite0 with its real ImageNet weights (the tlreg-efficientnet-lite plugin).
Validation balanced accuracy and accuracy of the last epoch go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench._report import HYMENOPTERA, ROOT, machine, write_section
from bench.perf import spawn

RATIO = 10
RESULTS = ROOT / "bench" / "results" / "imbalance.json"


def table(root: Path, seed: int) -> Path:
    """rare.csv: every training ant, a seeded 1/RATIO as many bees, the whole val split."""
    rows = []
    ants = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
    bees = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))
    random.Random(seed).shuffle(bees)
    for files, label in ((ants, "ants"), (bees[:max(2, len(ants) // RATIO)], "bees")):
        rows += [(str(f), label, "train") for f in files]
    for label in ("ants", "bees"):
        rows += [(str(f), label, "val") for f in sorted((HYMENOPTERA / "val" / label).glob("*"))
                 if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    path = root / f"rare-{seed}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def train(data: Path, out: Path, cache: Path, policy: str, seed: int,
          weights: str) -> dict[str, Any]:
    argv = ["tlreg", "train", str(data), "--backbone", "efficientnet_lite0", "--policy", policy,
            "--class-weights", weights, "--seed", str(seed), "--device", "cpu", "--quiet",
            "--out", str(out)]
    if policy == "finetune":
        argv += ["--epochs", "3"]
    r = spawn(argv, env={"TLREG_CACHE_DIR": str(cache)})
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r['stderr_tail']}")
    last = json.loads((out / "history.json").read_text())[-1]
    return {"policy": policy, "seed": seed, "class_weights": weights, "wall_s": r["wall_s"],
            "val_balanced_accuracy": last["val_balanced_accuracy"],
            "val_accuracy": last["val_accuracy"], "val_macro_f1": last["val_macro_f1"]}


def report(runs: list[dict[str, Any]]) -> str:
    rows = []
    for policy in ("feature-extract", "finetune"):
        mine = [r for r in runs if r["policy"] == policy]
        if not mine:
            continue
        cells = []
        for weights in ("none", "auto"):
            picked = [r for r in mine if r["class_weights"] == weights]
            cells.append(picked)
        seeds = len(cells[0])
        for key in ("val_balanced_accuracy", "val_accuracy", "val_macro_f1"):
            plain = [r[key] for r in cells[0]]
            auto = [r[key] for r in cells[1]]
            rows.append(f"| {policy} ({seeds} seed{'s' if seeds > 1 else ''}) | {key} | "
                        f"{statistics.mean(plain):.4f} | {statistics.mean(auto):.4f} | "
                        f"{statistics.mean(auto) - statistics.mean(plain):+.4f} | "
                        f"{', '.join(f'{a - p:+.3f}' for p, a in zip(plain, auto, strict=True))} |")
    return "\n".join([
        f"`python -m bench.imbalance` on {machine()}: hymenoptera, every training ant and a "
        f"seeded 1/{RATIO} as many bees (124 : 12), the whole val split (70 ants, 83 bees); "
        "EfficientNet-Lite0 (ImageNet weights); last epoch. Both runs of a seed share the "
        "subsample and the feature cache.", "",
        "| policy | metric | plain | `--class-weights auto` | difference (mean) | per seed |",
        "| --- | --- | ---: | ---: | ---: | --- |", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--finetune-seeds", type=int, default=1)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for policy, seeds in (("feature-extract", args.seeds), ("finetune", args.finetune_seeds)):
            for seed in range(seeds):
                data = table(tmp, seed)
                for weights in ("none", "auto"):  # interleaved: the same machine state
                    r = train(data, tmp / f"{policy}-{seed}-{weights}", tmp / "cache", policy,
                              seed, weights)
                    print(json.dumps(r))
                    runs.append(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2) + "\n")
    write_section("imbalance", report(runs))
    print(report(runs))


if __name__ == "__main__":
    main()
