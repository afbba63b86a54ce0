"""float16 features (`--feature-dtype float16`): the bytes they save and what they cost in accuracy.

Issue 19. On each data set of the accuracy suite (`bench._datasets`) and EfficientNet-Lite0
(ImageNet weights), `tlreg train --policy feature-extract` with every other option at its
default, once with the cache storing float32 rows and once float16, each in a fresh process
and its own cache (the first seed computes the features, the others read them). Recorded:
validation accuracy (mean over `SEEDS`), the head's chosen C, bytes of the cache entry on disk,
the largest relative rounding error of a feature row, and how many val predictions the two
runs disagree on.

    python -m bench.feature_dtype [--data NAME ...]
    python -m bench.feature_dtype --quick      # CI: faces, a tiny random model, one seed
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _datasets
from bench._report import ROOT, environment, machine, write_section
from bench.accuracy import DATA_ROOT
from bench.perf import spawn

BACKBONE = "efficientnet_lite0"
SEEDS = (0, 1, 2)
DTYPES = ("float32", "float16")
RESULTS = ROOT / "bench" / "results"


def train(data: Path, out: Path, cache: Path, dtype: str, seed: int,
          model: list[str]) -> dict[str, Any]:
    cmd = ["tlreg", "train", str(data), *model, "--policy", "feature-extract", "--out",
           str(out), "--quiet", "--seed", str(seed), "--feature-dtype", dtype,
           "--cache-dir", str(cache), "--no-report"]
    r = spawn(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r['stderr_tail']}")
    summary = json.loads((out / "summary.json").read_text())
    fit = summary.get("head_fit") or {}
    return {"seed": seed, "val_accuracy": summary["val_accuracy"], "wall_s": r["wall_s"],
            "C": fit.get("C"), "cv_accuracy": fit.get("cv_accuracy")}


def _entry(cache: Path) -> Path:
    from tlreg.data.features import CHUNK_GLOB

    entries = [d for d in (cache / "features").glob("*") if any(d.glob(CHUNK_GLOB))]
    assert len(entries) == 1, entries
    return entries[0]


def _predictions(run: Path, data: Path) -> dict[str, str]:
    """file -> top-1 label of `tlreg predict RUN DATA/val` (its CSV)."""
    import csv

    table = run / "val-predictions.csv"
    r = spawn(["tlreg", "predict", str(run), str(data / "val"), "--csv", str(table)])
    if r["rc"] != 0:
        raise SystemExit(f"tlreg predict {run} failed:\n{r['stderr_tail']}")
    with table.open() as f:
        return {row["file"]: row["label"] for row in csv.DictReader(f) if row["rank"] == "1"}


def run_dataset(name: str, seeds: tuple[int, ...], work: Path,
                model: list[str]) -> dict[str, Any]:
    import torch

    from tlreg.data.features import load_entry

    data = _datasets.build(name, DATA_ROOT)
    result: dict[str, Any] = {"data": name, "model": model, "runs": {}, "entry_bytes": {}}
    rows: dict[str, tuple[list[str], torch.Tensor]] = {}
    for dtype in DTYPES:
        cache = work / f"cache-{name}-{dtype}"
        runs = [train(data, work / f"{name}-{dtype}-{s}", cache, dtype, s, model)
                for s in seeds]
        result["runs"][dtype] = runs
        entry = _entry(cache)
        result["entry_bytes"][dtype] = sum(p.stat().st_size for p in entry.iterdir())
        rows[dtype] = load_entry(entry)
        print(f"{name} {dtype}: " + ", ".join(f"{r['val_accuracy']:.4f}" for r in runs)
              + f"; entry {result['entry_bytes'][dtype] / 2**20:.2f} MB", flush=True)
    names32, x32 = rows["float32"]
    names16, x16 = rows["float16"]
    x16 = x16[[names16.index(n) for n in names32]]
    rel = (x16 - x32).norm(dim=1) / x32.norm(dim=1).clamp_min(1e-12)
    result["max_relative_error"] = float(rel.max())
    result["images"] = len(names32)
    first = [_predictions(work / f"{name}-{d}-{seeds[0]}", data) for d in DTYPES]
    if set(first[0]) != set(first[1]):
        raise SystemExit(f"{name}: the two runs predicted different files")
    result["val_disagreements"] = sum(first[0][f] != first[1][f] for f in first[0])
    result["val_images"] = len(first[0])
    return result


def table(results: list[dict[str, Any]]) -> str:
    out = ["| data set | images | float32 val acc | float16 val acc | difference (val images) "
           "| val predictions that differ | largest row error | entry float32 | float16 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        acc = {d: statistics.mean(x["val_accuracy"] for x in r["runs"][d]) for d in DTYPES}
        diff = (acc["float16"] - acc["float32"]) * r["val_images"]
        b = r["entry_bytes"]
        out.append(f"| {r['data']} | {r['images']:,} | {acc['float32']:.4f} | "
                   f"{acc['float16']:.4f} | {diff:+.1f} | {r['val_disagreements']} of "
                   f"{r['val_images']} | {r['max_relative_error']:.1e} | "
                   f"{b['float32'] / 2**20:.2f} MB | {b['float16'] / 2**20:.2f} MB "
                   f"({b['float16'] / b['float32']:.2f}x) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.feature_dtype",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", choices=sorted(_datasets.NEAR_IMAGENET))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    names = ["faces"] if a.quick else (a.data or sorted(_datasets.NEAR_IMAGENET))
    seeds = SEEDS[:1] if a.quick else SEEDS
    model = (["--backbone", "timm:test_efficientnet", "--no-pretrained", "--img-size", "64"]
             if a.quick else ["--backbone", BACKBONE])
    if not a.quick:
        from tlreg.models.backbones import get_backbone

        get_backbone(BACKBONE)  # the Lite plugin and its weights, before any run
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as t:
        results = [run_dataset(n, seeds, Path(t), model) for n in names]
    print(table(results))
    print(f"bench.feature_dtype: {time.perf_counter() - t0:.0f} s")
    if a.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature-dtype.json").write_text(json.dumps(
        {"environment": environment(), "seeds": list(seeds), "results": results}, indent=1))
    write_section("feature-dtype", "\n".join([
        "## float16 features: bytes saved, accuracy kept? (issue 19)", "",
        f"`python -m bench.feature_dtype` on {machine()}. EfficientNet-Lite0 (ImageNet "
        "weights), `tlreg train --policy feature-extract` at its defaults with "
        "`--feature-dtype float32` and `float16`, each with its own cache, fresh processes; "
        f"val accuracy is the mean of {len(seeds)} seeds. *largest row error*: the largest "
        "`|x16 - x32| / |x32|` over the feature rows; *val predictions that differ*: "
        "`tlreg predict` of the two seed-0 runs over the val folder.", "",
        table(results)]))


def run(quick: bool = False) -> None:
    main(["--quick"] if quick else [])


if __name__ == "__main__":
    main()
