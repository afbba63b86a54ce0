"""The learning-rate finder on real weights and photos: the sweep's cost, and `--lr find`
against the default rate.

    python -m bench.lr_find [--seeds 1] [--epochs 3]

EfficientNet-Lite0 with its ImageNet weights (the tlreg-efficientnet-lite plugin) on
hymenoptera. First `tlreg lr-find` on cached features (feature extraction; the first call
fills the feature cache, the second is the sweep alone), then per seed two fine-tuning runs,
interleaved: the data-aware default rate, and `--lr find`. Each run is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench._report import HYMENOPTERA, ROOT, machine, write_section
from bench.perf import spawn

RESULTS = ROOT / "bench" / "results" / "lr_find.json"
BACKBONE = ["--backbone", "efficientnet_lite0", "--device", "cpu"]


def _spawn(argv: list[str], cache: Path) -> dict[str, Any]:
    r = spawn(argv, env={"TLREG_CACHE_DIR": str(cache)})
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r['stderr_tail']}")
    return r


def sweep(out: Path, cache: Path) -> dict[str, Any]:
    r = _spawn(["tlreg", "lr-find", str(HYMENOPTERA), "--policy", "feature-extract", *BACKBONE,
             "--out", str(out), "--quiet"], cache)
    found = json.loads((out / "lr_find.json").read_text())
    return {"wall_s": r["wall_s"], "sweep_s": found["seconds"], "steps": len(found["lrs"]),
            "stopped": found["stopped"], "suggestions": found["suggestions"]}


def finetune(out: Path, cache: Path, seed: int, epochs: int, find: bool) -> dict[str, Any]:
    argv = ["tlreg", "train", str(HYMENOPTERA), "--policy", "finetune", *BACKBONE, "--seed",
            str(seed), "--epochs", str(epochs), "--quiet", "--out", str(out)]
    if find:
        argv += ["--lr", "find"]
    r = _spawn(argv, cache)
    last = json.loads((out / "history.json").read_text())[-1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    found = json.loads((out / "run.json").read_text()).get("lr_find")
    return {"seed": seed, "lr_find": find, "lr": config["lr"], "wall_s": r["wall_s"],
            "val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"],
            "sweep_s": found and found["seconds"], "sweep_steps": found and found["steps"]}


def report(sweeps: list[dict[str, Any]], runs: list[dict[str, Any]], epochs: int) -> str:
    warm = sweeps[-1]
    lines = [
        f"`python -m bench.lr_find` on {machine()}: EfficientNet-Lite0 (ImageNet weights), "
        "hymenoptera (244 train, 153 val), each run a fresh process.", "",
        "| sweep | steps | stopped | sweep seconds | process wall seconds | valley | steep |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in zip(("cold feature cache", "warm feature cache"), sweeps, strict=True):
        lines.append(f"| `tlreg lr-find --policy feature-extract`, {name} | {s['steps']} | "
                     f"{s['stopped']} | {s['sweep_s']:.2f} | {s['wall_s']:.1f} | "
                     f"{s['suggestions']['valley']:.3g} | {s['suggestions']['steep']:.3g} |")
    lines += ["", f"Fine-tuning, {epochs} epochs, last epoch:", "",
              "| rate | seed | head lr | val accuracy | val loss | sweep seconds | wall seconds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        name = "`--lr find`" if r["lr_find"] else "data-aware default"
        swept = "-" if r["sweep_s"] is None else f"{r['sweep_s']:.0f}"
        lines.append(f"| {name} | {r['seed']} | {r['lr']:.3g} | {r['val_accuracy']:.4f} | "
                     f"{r['val_loss']:.4f} | {swept} | {r['wall_s']:.0f} |")
    found = [r["val_accuracy"] for r in runs if r["lr_find"]]
    plain = [r["val_accuracy"] for r in runs if not r["lr_find"]]
    lines += ["", f"Mean val accuracy: default {statistics.mean(plain):.4f}, `--lr find` "
              f"{statistics.mean(found):.4f} ({len(found)} seed{'s' if len(found) > 1 else ''});"
              f" the warm sweep on cached features took {warm['sweep_s']:.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sweeps = [sweep(tmp / f"sweep-{i}", tmp / "cache") for i in range(2)]
        print(json.dumps(sweeps))
        runs = []
        for seed in range(args.seeds):
            for find in (False, True):  # interleaved: the same machine state
                r = finetune(tmp / f"ft-{seed}-{find}", tmp / "cache", seed, args.epochs, find)
                print(json.dumps(r))
                runs.append(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "sweeps": sweeps, "runs": runs},
                                  indent=2) + "\n")
    write_section("lr_find", report(sweeps, runs, args.epochs))
    print(report(sweeps, runs, args.epochs))


if __name__ == "__main__":
    main()
