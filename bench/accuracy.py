"""The accuracy suite: tlreg's defaults against a scikit-learn probe, on five real data sets.

For each data set of `bench._datasets` and EfficientNet-Lite0 (real ImageNet weights), every
option left at its default:

* `feature-extract`: `tlreg train --policy feature-extract`;
* `auto`: `tlreg train` (no policy named);
* `finetune`: `tlreg train --policy finetune`;
* `reference`: scikit-learn's `LogisticRegression` on the very features tlreg cached in this
  run, standardised inside each fold (`Pipeline(StandardScaler, LogisticRegression)`), C
  chosen by `GridSearchCV` with 5 stratified folds on the training split only.

Each `tlreg` run is a fresh process. Mean over `SEEDS` for the probe, `feature-extract` and
`auto` and `finetune`, except on the two large sets (`ONE_SEED_FINETUNE`), where fine-tuning
costs 10-20 minutes a run on these 2 cores and the first seed alone is run (marked). Results go
to `bench/results/accuracy-NAME.json`; the table in docs/benchmarks.md is rebuilt from every
such file, so one data set can be rerun alone:

    python -m bench.accuracy [--data NAME ...] [--methods feature-extract,auto,finetune]
    python -m bench.accuracy --quick      # CI: faces, feature-extract + reference, one seed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench import _datasets
from bench._report import ROOT, machine, write_section
from bench.perf import spawn

BACKBONE = "efficientnet_lite0"
SEEDS = (0, 1, 2)
ONE_SEED_FINETUNE = {"digits", "patches"}  # fine-tuning 1,200-1,500 images: minutes per run
METHODS = ("feature-extract", "auto", "finetune")
RESULTS = ROOT / "bench" / "results"
DATA_ROOT = Path(os.environ.get("TLREG_BENCH_DATA", "/tmp/tlreg-bench-data"))


def train(data: Path, out: Path, cache: Path, method: str, seed: int) -> dict[str, Any]:
    cmd = ["tlreg", "train", str(data), "--backbone", BACKBONE, "--out", str(out), "--quiet",
           "--seed", str(seed)]
    if method != "auto":
        cmd += ["--policy", method]
    r = spawn(cmd, env={"TLREG_CACHE_DIR": str(cache)})
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r['stderr_tail']}")
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    chosen = (summary.get("policy_auto") or {}).get("policy")
    return {"seed": seed, "val_accuracy": summary["val_accuracy"], "wall_s": r["wall_s"],
            "epochs": summary["epochs"], "auto_policy": chosen,
            "auto_reason": (summary.get("policy_auto") or {}).get("reason"),
            "head_fit": summary.get("head_fit") or summary.get("linear_probe"),
            "finetune_defaults": summary.get("finetune_defaults"),
            "augment": summary.get("augment"),
            "val_accuracy_by_epoch": [e["val_accuracy"] for e in history]}


def reference(data: Path, cache: Path, seed: int) -> dict[str, Any]:
    """scikit-learn's CV logistic regression on the features tlreg cached for `data`."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlreg.data.features import CHUNK_GLOB, load_entry
    from tlreg.data.sources import identity, open_source

    split = open_source(data, None, 0)
    entries = [d for d in (cache / "features").glob("*") if any(d.glob(CHUNK_GLOB))]
    assert len(entries) == 1, entries
    names, rows = load_entry(entries[0])
    feats, index = rows.numpy(), {n: i for i, n in enumerate(names)}

    def xy(samples: Any) -> tuple[Any, Any]:
        keys = [(identity(s)[0], s.label) for s in samples]
        pairs = [(index[k], y) for k, y in keys if k in index]
        return feats[[r for r, _ in pairs]], np.array([y for _, y in pairs])

    x_train, y_train = xy(split.train)
    x_val, y_val = xy(split.val)
    if not len(y_val):
        raise SystemExit(f"reference: no val features of {data} in {entries[0]}; run "
                         "feature-extract first")
    grid = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        {"logisticregression__C": np.logspace(-4, 2, 13)},
        cv=StratifiedKFold(5, shuffle=True, random_state=seed), n_jobs=1)
    grid.fit(x_train, y_train)
    return {"seed": seed, "val_accuracy": float((grid.predict(x_val) == y_val).mean()),
            "C": float(grid.best_params_["logisticregression__C"]),
            "val_images": len(y_val), "train_images": len(y_train)}


def run_dataset(name: str, methods: tuple[str, ...], seeds: tuple[int, ...],
                work: Path) -> dict[str, Any]:
    data = _datasets.build(name, DATA_ROOT)
    cache = work / f"cache-{name}"
    result: dict[str, Any] = {"data": name, "near_imagenet": _datasets.NEAR_IMAGENET[name],
                              "runs": {}}
    for method in methods:
        one = method in ("finetune", "auto") and name in ONE_SEED_FINETUNE
        method_seeds = seeds[:1] if one else seeds
        runs = [train(data, work / f"{name}-{method}-{s}", cache, method, s)
                for s in method_seeds]
        result["runs"][method] = runs
        print(f"{name} {method}: " + ", ".join(f"{r['val_accuracy']:.4f}" for r in runs),
              flush=True)
    if "feature-extract" in methods:  # its run cached the val features the reference needs
        result["runs"]["reference"] = [reference(data, cache, s) for s in seeds]
        result["val_images"] = result["runs"]["reference"][0]["val_images"]
        result["train_images"] = result["runs"]["reference"][0]["train_images"]
    return result


def _cell(runs: list[dict[str, Any]] | None, seeds: int) -> str:
    if not runs:
        return "-"
    mean = statistics.mean(r["val_accuracy"] for r in runs)
    mark = "" if len(runs) == seeds else f" ({len(runs)} seed)"
    return f"{mean:.4f}{mark}"


def table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("accuracy-*.json")):
        res = json.loads(path.read_text())
        if "runs" not in res or "reference" not in res.get("runs", {}):
            continue  # an older file of another shape
        runs = res["runs"]
        seeds = len(runs["reference"])
        ref = statistics.mean(r["val_accuracy"] for r in runs["reference"])
        one = 1 / res["val_images"]
        fe = runs.get("feature-extract")
        gap = (statistics.mean(r["val_accuracy"] for r in fe) - ref) / one if fe else None
        auto = runs.get("auto") or []
        chosen = sorted({r["auto_policy"] for r in auto if r.get("auto_policy")})
        rows.append(
            f"| {res['data']} | {'near' if res['near_imagenet'] else 'far'} | "
            f"{res['train_images']} / {res['val_images']} | {ref:.4f} | {_cell(fe, seeds)} | "
            + (f"{gap:+.1f} |" if gap is not None else "- |")
            + f" {_cell(auto, seeds)} | {', '.join(chosen) or '-'} | "
            f"{_cell(runs.get('finetune'), seeds)} |")
    return "\n".join([
        f"`python -m bench.accuracy` on {machine()}. EfficientNet-Lite0 (ImageNet weights), "
        "every option at its default; validation accuracy, mean of 3 seeds (fewer where "
        "marked). `reference`: scikit-learn's logistic regression, C by 5-fold CV on the "
        "training split, on the same cached features. `FE - ref`: feature-extract minus the "
        "reference, in validation images (target: >= -1, or -0.5 points on large sets).", "",
        "| data set | ImageNet | train / val | reference | feature-extract | FE - ref (images) "
        "| auto | auto chose | finetune |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |", *rows])


def demo() -> None:
    """`tlreg demo`, whole process, cold cache: the README's first command."""
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        r = spawn(["tlreg", "demo", "--out", str(tmp / "demo"), "--quiet"],
                  env={"TLREG_CACHE_DIR": str(tmp / "cache")})
        if r["rc"] != 0:
            raise SystemExit(f"tlreg demo failed:\n{r['stderr_tail']}")
        summary = json.loads((tmp / "demo" / "summary.json").read_text())
    write_section("accuracy-demo", "\n".join([
        "### `tlreg demo`", "",
        f"`python -m bench.accuracy --demo` on {machine()}: EfficientNet-Lite0 feature "
        "extraction on the bundled hymenoptera copy, the head fitted by the default CV solver.",
        "", "| `tlreg demo` (cold cache, whole process) | value |", "| --- | ---: |",
        f"| wall time | {r['wall_s']:.1f} s (target < 60 s) |",
        f"| of which the one pass over the images | {summary['feature_seconds']:.1f} s |",
        f"| head fit (CV over C) | {summary['head_fit']['seconds']:.1f} s, "
        f"C={summary['head_fit']['C']:.3g} |",
        f"| val accuracy | {summary['val_accuracy']:.4f} |",
        f"| peak RSS | {r['peak_rss_kb'] / 1024:.0f} MiB |"]))


def run(quick: bool = False, data: list[str] | None = None,
        methods: tuple[str, ...] = METHODS, seeds: tuple[int, ...] = SEEDS) -> None:
    import tempfile

    try:
        import sklearn  # noqa: F401

        from tlreg.models.backbones import get_backbone

        get_backbone(BACKBONE)
    except Exception as exc:  # the suite needs the test extra and the Lite plugin
        print(f"skipped: {exc}")
        return
    with tempfile.TemporaryDirectory() as t:
        if quick:  # CI: the machinery end to end on the smallest set, nothing written
            res = run_dataset("faces", ("feature-extract",), (0,), Path(t))
            fe = res["runs"]["feature-extract"][0]["val_accuracy"]
            ref = res["runs"]["reference"][0]["val_accuracy"]
            print(f"faces: feature-extract {fe:.4f}, reference {ref:.4f}")
            return
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in data or list(_datasets.SOURCES):
            res = run_dataset(name, methods, seeds, Path(t))
            path = RESULTS / f"accuracy-{name}.json"
            if path.is_file() and set(methods) != set(METHODS):  # keep the methods not rerun
                old = json.loads(path.read_text())
                res = {**old, **res, "runs": {**old.get("runs", {}), **res["runs"]}}
            (RESULTS / f"accuracy-{name}.json").write_text(json.dumps(res, indent=2) + "\n")
            write_section("accuracy-suite", table())
    print(table())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", nargs="*", choices=list(_datasets.SOURCES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--demo", action="store_true", help="only `tlreg demo`, timed")
    parser.add_argument("--seeds", type=int, default=len(SEEDS),
                        help="at most this many seeds per method (the table marks fewer)")
    args = parser.parse_args()
    if args.demo:
        demo()
    else:
        run(args.quick, args.data, tuple(m for m in args.methods.split(",") if m),
            SEEDS[:max(1, args.seeds)])
