"""`tlreg rank` against training: does the ranking predict which backbone trains best?

For each data set of `bench._datasets` (the accuracy suite's five, built offline from real
images), in one process on a cold feature cache:

1. `tlreg.analysis.rank.rank` over efficientnet_lite0/1/2 (the `tlreg-efficientnet-lite`
   plugin's ImageNet weights) and `random:efficientnet_lite0`, a seeded random-init control;
2. every candidate trained with `tlreg.fit(TrainConfig(data=..., out=..., backbone=...))`,
   every option at its default (`--policy auto`; the control with `pretrained=False`).

Where `auto` would fine-tune, that run costs 30-60 minutes per backbone on 2 CPU cores (the
accuracy suite's digits runs: 1,700-2,000 s). Its decision is known before the run: `auto`
decides from the CV probe `rank` has just computed (the same solver, folds and seed on the same
features; `tlreg.engine.auto.decide`), so unless `--finetune` is given such a run is replaced
by the frozen default (`--policy feature-extract`, the cached features) and marked; every
other run is the true default, and the bench checks that `auto` decided as predicted.

Reported per data set: Kendall's tau-b between the order by LogME, and by probe CV accuracy,
and the order by the val accuracy training reached (over the four candidates, and over the
three pretrained ones alone); whether the control ranks last by both scores; and the cost of
ranking beyond the feature passes: (LogME + probes) / feature passes, in seconds of the same run.

    python -m bench.rank [--data NAME ...] [--finetune]   # bench/results/rank.json + docs
    python -m bench.rank --quick                          # CI: faces, Lite0 + control
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _datasets
from bench._report import ROOT, machine, write_section

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
CONTROL = "random:efficientnet_lite0"
RESULTS = ROOT / "bench" / "results" / "rank.json"
COST_SETS = ("hymenoptera", "patches")  # the issue's: hymenoptera and a 2,000-image set


def _data_root() -> Path:
    from bench.accuracy import DATA_ROOT

    return DATA_ROOT


def kendall(x: list[float | None], y: list[float | None]) -> float | None:
    """Kendall's tau-b (scipy's); None where it is undefined (a constant side, < 2 pairs)."""
    from scipy.stats import kendalltau

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    tau = kendalltau([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if tau is None or math.isnan(tau) else float(tau)


def predicted_policy(row: Any, split: Any) -> str:
    """What `--policy auto` will choose for this backbone: its rule on rank's own probe."""
    from tlreg.engine.auto import decide
    from tlreg.engine.objective import class_counts

    counts = class_counts([s.label for s in split.train], len(split.classes))
    return decide(train_images=len(split.train), smallest_class=min(counts),
                  probe_accuracy=row.cv_accuracy, num_stages=1).policy


def train(data: Path, row: Any, split: Any, work: Path, cache: Path,
          finetune: bool) -> dict[str, Any]:
    """`tlreg.fit` with the defaults (or the frozen default where auto would fine-tune)."""
    import tlreg
    from tlreg.engine.config import TrainConfig

    predicted = predicted_policy(row, split)
    substitute = predicted != "feature-extract" and not finetune
    options: dict[str, Any] = {"policy": "feature-extract"} if substitute else {}
    out = work / f"run-{row.name.replace(':', '-')}"
    t0 = time.perf_counter()
    result = tlreg.fit(TrainConfig(data=str(data), out=str(out), backbone=row.backbone,
                                   pretrained=row.pretrained, cache_dir=str(cache),
                                   quiet=True, **options))
    s = result.summary
    chosen = (s.get("policy_auto") or {}).get("policy") or options.get("policy")
    return {"val_accuracy": s["val_accuracy"], "policy": chosen, "auto_predicted": predicted,
            "substituted": substitute,
            "auto_as_predicted": None if substitute else chosen == predicted,
            "feature_seconds": s.get("feature_seconds"), "wall_s": time.perf_counter() - t0}


def run_dataset(name: str, backbones: tuple[str, ...], work: Path,
                finetune: bool) -> dict[str, Any]:
    from tlreg.analysis.rank import rank
    from tlreg.data.sources import open_source

    data = _datasets.build(name, _data_root())
    cache = work / f"cache-{name}"  # cold: every feature pass is measured
    split = open_source(str(data), None, 0)
    t0 = time.perf_counter()
    ranking = rank(split, backbones, cache_dir=str(cache), device="cpu")
    rank_wall = time.perf_counter() - t0
    rows = []
    for row in ranking.rows:
        if row.status != "ranked":
            raise SystemExit(f"{name}: {row.name} was not ranked: {row.reason}")
        trained = train(data, row, split, work, cache, finetune)
        rows.append(row.to_dict() | {"trained": trained})
        print(f"{name} {row.name}: probe {row.cv_accuracy:.4f} ± {row.cv_std or 0:.4f}, "
              f"LogME {row.logme:.4f}, trained {trained['val_accuracy']:.4f} "
              f"({trained['policy']}{', substituted' if trained['substituted'] else ''}); "
              f"features {row.feature_seconds:.1f}s, scores {row.score_seconds:.2f}s",
              flush=True)
    trained_acc = [r["trained"]["val_accuracy"] for r in rows]
    pre = [i for i, r in enumerate(rows) if not r["control"]]
    control = [i for i, r in enumerate(rows) if r["control"]]

    def last(key: str) -> bool | None:
        if not control:
            return None
        return all(rows[control[0]][key] < rows[i][key] for i in pre)

    feature_s = sum(r["feature_seconds"] for r in rows)
    score_s = sum(r["score_seconds"] for r in rows)
    return {
        "data": name, "train_images": ranking.train_images, "val_images": ranking.val_images,
        "rows": rows, "rank_wall_s": rank_wall,
        "tau_logme": kendall([r["logme"] for r in rows], trained_acc),
        "tau_probe": kendall([r["cv_accuracy"] for r in rows], trained_acc),
        "tau_logme_pretrained": kendall([rows[i]["logme"] for i in pre],
                                        [trained_acc[i] for i in pre]),
        "tau_probe_pretrained": kendall([rows[i]["cv_accuracy"] for i in pre],
                                        [trained_acc[i] for i in pre]),
        "control_last_logme": last("logme"), "control_last_probe": last("cv_accuracy"),
        "control_last_trained": None if not control else all(
            trained_acc[control[0]] < trained_acc[i] for i in pre),
        "feature_seconds": feature_s, "score_seconds": score_s,
        "score_share": score_s / feature_s if feature_s else None,
        "best": ranking.to_dict()["best"],
        "best_trained": [rows[i]["name"] for i in pre  # every pretrained one at the top
                         if trained_acc[i] == max(trained_acc[j] for j in pre)],
        "recommendation": ranking.recommendation,
    }


def _tau(value: float | None) -> str:
    return "n/a (ties)" if value is None else f"{value:+.2f}"


def _names(names: str | list[str]) -> str:
    names = [names] if isinstance(names, str) else names
    return ", ".join(n.removeprefix("efficientnet_") for n in names)


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _earlier(results: dict[str, Any]) -> str:
    """Which sets' rows come from an earlier run (`--data` reruns only some), and where."""
    by_run: dict[str, list[str]] = {}
    for name, res in sorted(results["sets"].items()):
        if res.get("machine") and res["machine"] != results["machine"]:
            by_run.setdefault(res["machine"], []).append(name)
    return "".join(f" ({', '.join(names)}: an earlier run, {where})"
                   for where, names in by_run.items())


def table(results: dict[str, Any]) -> str:
    sets = [results["sets"][k] for k in sorted(results["sets"])]
    lines = [
        f"`python -m bench.rank` on {results['machine']}; {results['wall_s'] / 60:.1f} min "
        f"for the whole run{_earlier(results)}. `tlreg rank` over EfficientNet-Lite0/1/2 "
        "(ImageNet weights) and "
        f"`{CONTROL}` (seeded random init), 5-fold CV probe and LogME on each train split, "
        "cold cache; then every candidate trained with `tlreg.fit` at its defaults "
        "(`--policy auto`). Where `auto` would fine-tune (predicted from rank's own probe, "
        "the very measurement auto decides on), the frozen default was run instead "
        "(`feature-extract`, marked *fe*): fine-tuning costs 30-60 min per backbone on these "
        "2 cores. Kendall's tau-b of each score's order against the order of the trained val "
        "accuracy (1: the same order; ties in the trained accuracies lower it).", "",
        "| data set | train / val | tau LogME | tau probe | tau LogME (3 Lites) "
        "| tau probe (3 Lites) | control last (LogME / probe / trained) | rank picks "
        "| trains best (of the 3 Lites) | LogME + probes / feature passes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for s in sets:
        lines.append(
            f"| {s['data']} | {s['train_images']} / {s['val_images']} | "
            f"{_tau(s['tau_logme'])} | {_tau(s['tau_probe'])} | "
            f"{_tau(s['tau_logme_pretrained'])} | {_tau(s['tau_probe_pretrained'])} | "
            f"{_yes(s['control_last_logme'])} / {_yes(s['control_last_probe'])} / "
            f"{_yes(s['control_last_trained'])} | {_names(s['best'])} | "
            f"{_names(s['best_trained'])} | "
            f"{s['score_seconds']:.1f} s / {s['feature_seconds']:.0f} s = "
            f"{100 * s['score_share']:.1f}% |")
    lines += ["", "| data set | backbone | probe CV acc (± fold sd) | LogME | rank's val acc "
              "| trained val acc (policy) | params | feature pass | LogME + probe |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sets:
        for r in s["rows"]:
            t = r["trained"]
            policy = t["policy"] + (" *fe*" if t["substituted"] else "")
            estimate = ("" if r.get("estimate_seconds") is None
                        else f" ({r['estimate_seconds']:.0f} s)")
            lines.append(
                f"| {s['data']} | {r['name']} | {r['cv_accuracy']:.4f} ± {r['cv_std']:.4f} | "
                f"{r['logme']:.3f} | {r['val_accuracy']:.4f} | {t['val_accuracy']:.4f} "
                f"({policy}) | {r['params'] / 1e6:.1f}M | {r['feature_seconds']:.1f} s"
                f"{estimate} | {r['score_seconds']:.2f} s |")
    return "\n".join(lines)


def run(quick: bool = False, data: list[str] | None = None, finetune: bool = False) -> None:
    try:
        import scipy  # noqa: F401 - Kendall's tau (scikit-learn's dependency, the test extra)

        from tlreg.models.transfer import create_model

        for name in BACKBONES[:1] if quick else BACKBONES:  # weights installed, not only names
            create_model(name, 2, policy="feature-extract")
    except Exception as exc:  # the suite needs the test extra and the Lite plugin's weights
        print(f"skipped: {exc}")
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as t:
        if quick:  # CI: the machinery end to end on the smallest set, nothing written
            res = run_dataset("faces", (BACKBONES[0], CONTROL), Path(t), finetune=False)
            print(f"faces: tau LogME {_tau(res['tau_logme'])}, probe {_tau(res['tau_probe'])}, "
                  f"control last {res['control_last_logme']}/{res['control_last_probe']}, "
                  f"scores {100 * res['score_share']:.1f}% of the feature passes")
            return
        old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"sets": {}}
        results = {"sets": dict(old.get("sets", {}))}
        for res in results["sets"].values():  # a set not rerun keeps the run it came from
            res.setdefault("machine", old.get("machine"))
        for name in data or list(_datasets.SOURCES):
            work = Path(t) / name
            work.mkdir()
            results["sets"][name] = run_dataset(name, (*BACKBONES, CONTROL), work, finetune)
            results["sets"][name]["machine"] = machine()
        results |= {"machine": machine(), "wall_s": time.perf_counter() - t0,
                    "finetune": finetune, "backbones": [*BACKBONES, CONTROL]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        report(results)


def report(results: dict[str, Any] | None = None) -> None:
    """docs/benchmarks.md's section from the results (bench/results/rank.json by default)."""
    results = results or json.loads(RESULTS.read_text())
    write_section("rank", "### `tlreg rank` against training (issue 16)\n\n" + table(results))
    print(table(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", nargs="*", choices=list(_datasets.SOURCES))
    parser.add_argument("--finetune", action="store_true",
                        help="run auto's fine-tuning where it chooses it (hours on a CPU)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the docs section from bench/results/rank.json")
    args = parser.parse_args()
    if args.report:
        report()
    else:
        run(args.quick, args.data, args.finetune)
