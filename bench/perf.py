"""Speed and memory of `tlreg train` / `tlreg predict` against the baselines in bench/baselines.py.

Every measured run is a fresh process (imports included), timed from the outside, with its peak
memory read from the kernel: `ru_maxrss` of the process (largest single process: main or a
worker) and the peak of the summed RSS of its whole process tree, sampled every 0.25 s (an
upper bound: pages shared between the main process and its forked workers count once each).
Variants run interleaved (A B A B ...), `--runs` rounds; ratios are computed pair by pair
(round i of A against round i of B), then min / median / max.

    python -m bench.perf                 # every figure (about 40 min on 2 idle CPU cores)
    python -m bench.perf --figure 2      # one figure; repeat --figure for several
    python -m bench.perf --figure 2 --models resnet18 --epochs 2 --variants classic,handtuned
    python -m bench.perf --quick         # tiny sizes, in seconds, for CI; nothing in the repo
    python -m bench.perf --figure 2 --base-tlreg ../venv-old/bin/tlreg   # A/B against a commit

Figures: 1 feature-extract 10 epochs, whole process (tlreg vs classic); 2 fine-tune training
images/s (tlreg vs classic vs hand-tuned); 3 the data pipeline alone (tlreg vs ImageFolder + PIL);
4 peak memory of every run of 1, 2, 3 and 5 (no runs of its own); 5 `tlreg predict` cold start
on one image and batched images/s: the torch path, the run exported to ONNX (onnxruntime, no
torch imported), the classic baseline and both import floors.

Raw per-run JSON goes to bench/results/fig<N>-<timestamp>.json; the `<!-- bench:perf -->`
section of docs/benchmarks.md is rewritten from the newest file of each figure, so figures can
be rerun one at a time. `--quick` writes both to a temporary folder instead (removed at the
end unless `--keep`), runs most variants in this process (a fresh process per run would take
minutes). Any failed run makes the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._report import environment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:perf -->", "<!-- /bench:perf -->"
GIB = 1024 * 1024  # KiB per GiB
OTHER_CPU_WARN = 0.10  # share of the CPU taken by other processes above which timings are flagged


@dataclass(frozen=True)
class Model:
    """A backbone as tlreg names it and as the baselines name it."""

    key: str
    tlreg_args: tuple[str, ...]
    baseline: str
    pretrained: bool


MODELS = {
    "efficientnet_lite0": Model("efficientnet_lite0", ("--backbone", "efficientnet_lite0"),
                                "efficientnet_lite0", True),
    "resnet18": Model("resnet18", ("--backbone", "resnet18", "--no-pretrained"), "resnet18",
                      False),
    "test_resnet": Model("test_resnet", ("--backbone", "timm:test_resnet", "--no-pretrained"),
                         "test_resnet", False),
    "test_efficientnet": Model("test_efficientnet",
                               ("--backbone", "timm:test_efficientnet", "--no-pretrained"),
                               "test_efficientnet", False),
}


@dataclass
class Settings:
    quick: bool
    runs: int
    data: Path
    work: Path
    results: Path
    doc: Path
    models: tuple[str, ...] | None = None
    epochs: int | None = None
    variants: tuple[str, ...] | None = None
    command: str = ""
    device: str = "cpu"
    base_tlreg: str | None = None  # a `tlreg` executable of another install: variant tlreg-base
    failures: list[str] = field(default_factory=list)

    def models_for(self, default: Sequence[str]) -> list[Model]:
        keys = self.models or (("test_efficientnet",) if self.quick else tuple(default))
        return [MODELS[k] for k in keys]

    def wanted(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants


# -- running and measuring one command ------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _proc_kb(pid: int) -> int:
    """RSS of one process in KiB; 0 once it is gone.

    /proc/PID/status costs microseconds; PSS (smaps_rollup) would be the fairer sum but costs
    ~50 ms per read of a torch process, which on 2 cores steals measurable time from the run.
    """
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _tree_kb(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += _children(p)
        total += _proc_kb(p)
    return total


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _executable(argv: Sequence[str]) -> list[str]:
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "tlreg":
        script = Path(sys.executable).with_name("tlreg")
        return [str(script), *argv[1:]] if script.exists() else \
            [sys.executable, "-m", "tlreg", *argv[1:]]
    return list(argv)


def spawn(argv: Sequence[str], env: dict[str, str] | None = None,
          timeout: float = 4 * 3600) -> dict[str, Any]:
    """Run `argv` in a fresh process: wall time, exit code, peak memory, output tails.

    The repository goes on PYTHONPATH (for `python -m bench...`) unless `env` sets it: another
    install's tlreg (tlreg-base) must not import this checkout's."""
    full_env = {**os.environ, **(env or {})}
    if "PYTHONPATH" not in (env or {}):
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = _busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(_executable(argv), stdout=out, stderr=err, cwd=ROOT, env=full_env)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                peak[0] = max(peak[0], _tree_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - t0
        busy1 = _busy_cpu_s()
        proc.returncode = os.waitstatus_to_exitcode(status)
        own = usage.ru_utime + usage.ru_stime  # the run and the workers it waited for
        # CPU time other processes took while this ran: the interference that skews timings
        other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - own)
        sampler.join()
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "rc": proc.returncode, "peak_rss_kb": usage.ru_maxrss,
                "cpu_s": own, "other_cpu_s": other, "minor_faults": usage.ru_minflt,
                "other_cpu_share": (None if other is None
                                    else other / (wall * (os.cpu_count() or 1))),
                "tree_peak_rss_kb": peak[0] or None, "in_process": False,
                "stdout_tail": out.read()[-2000:].decode(errors="replace"),
                "stderr_tail": err.read()[-3000:].decode(errors="replace")}


@contextlib.contextmanager
def _environ(env: dict[str, str] | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_process(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """`--quick` only: run a tlreg or baseline command in this process (no memory figures)."""
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    t0 = time.perf_counter()
    with _environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "tlreg":
                from tlreg.cli import main as tlreg_main

                tlreg_main(list(argv[1:]))
            elif list(argv[:3]) == ["python", "-m", "bench.baselines"]:
                from bench import baselines

                baselines.main(list(argv[3:]))
            elif list(argv[:3]) == ["python", "-m", "bench.perf"]:
                worker(list(argv[3:]))
            else:
                raise ValueError(f"cannot run {argv} in process")
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # reported like a failed process
            rc = 1
            print(f"{type(exc).__name__}: {exc}", file=err)
    return {"wall_s": time.perf_counter() - t0, "rc": rc, "peak_rss_kb": None,
            "cpu_s": None, "other_cpu_s": None, "other_cpu_share": None,
            "tree_peak_rss_kb": None, "in_process": True,
            "stdout_tail": out.getvalue()[-2000:], "stderr_tail": err.getvalue()[-3000:]}


def measure(s: Settings, figure: int, rnd: int, model: Model, variant: str,
            argv: Sequence[str], *, env: dict[str, str] | None = None, spawned: bool = True,
            read: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One run: measured, its result read back (`read`), reported on one line."""
    load_before = os.getloadavg()[0]
    rec = (spawn(argv, env) if spawned or not s.quick else in_process(argv, env))
    # the 1-minute load average before and after: other work on the machine skews timings
    rec = {"figure": figure, "round": rnd, "model": model.key, "variant": variant,
           "argv": list(argv), "env": env or {}, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg()[0], **rec}
    if rec["rc"] == 0 and read is not None:
        try:
            rec["result"] = read()
        except (OSError, ValueError, KeyError) as exc:
            rec["rc"], rec["read_error"] = -1, f"{type(exc).__name__}: {exc}"
    if rec["rc"] != 0:
        s.failures.append(f"figure {figure} {model.key} {variant} round {rnd}: rc {rec['rc']}: "
                          f"{rec.get('read_error') or rec['stderr_tail'][-600:]}")
    mem, share = rec["peak_rss_kb"], rec["other_cpu_share"]
    print(f"  fig{figure} round {rnd + 1} {model.key:<18} {variant:<14} {rec['wall_s']:7.1f} s"
          + (f"  peak RSS {mem / 1024:6.0f} MiB" if mem else "")
          + (f"  other processes {share:4.0%} of the CPU" if share is not None else "")
          + ("" if rec["rc"] == 0 else f"  FAILED rc={rec['rc']}"), flush=True)
    return rec


def _read_json(path: Path) -> Callable[[], dict[str, Any]]:
    return lambda: json.loads(path.read_text())


def _read_run(run_dir: Path) -> Callable[[], dict[str, Any]]:
    return lambda: {"summary": json.loads((run_dir / "summary.json").read_text()),
                    "history": json.loads((run_dir / "history.json").read_text())}


def tlreg_train(s: Settings, model: Model, policy: str, epochs: int | None,
                out: Path) -> list[str]:
    """`tlreg train`; epochs None leaves tlreg's default (one CV fit for a frozen backbone)."""
    return ["tlreg", "train", str(s.data), *model.tlreg_args, "--policy", policy,
            *(["--epochs", str(epochs)] if epochs is not None else []), "--batch-size", "32",
            "--device", s.device, "--out", str(out), "--quiet"]


def baseline(s: Settings, loop: str, model: Model, *args: str) -> list[str]:
    return ["python", "-m", "bench.baselines", loop, "--data", str(s.data),
            "--model", model.baseline, "--batch-size", "32", "--device", s.device, "--quiet",
            *args]


# -- statistics ---------------------------------------------------------------------------------

def stats(values: Sequence[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def _metric(runs: list[dict[str, Any]], model: str, variant: str,
            key: str) -> dict[int, float | None]:
    return {r["round"]: r.get("metrics", {}).get(key) for r in runs
            if r["model"] == model and r["variant"] == variant and r["rc"] == 0}


def pair_ratios(runs: list[dict[str, Any]], model: str, num: tuple[str, str],
                den: tuple[str, str]) -> dict[str, float] | None:
    """num/den, run by run for the rounds both have: (variant, metric) each."""
    a, b = _metric(runs, model, *num), _metric(runs, model, *den)
    return stats([a[r] / b[r] for r in sorted(set(a) & set(b))
                  if a[r] is not None and b[r]])


def after_first(history: list[dict[str, Any]], seconds_key: str) -> float | None:
    """Training images/s over the epochs after the first (total images / total seconds)."""
    rows = history[1:] or history
    images = sum(r.get("train_images") or r["images_per_second"] * r["seconds"] for r in rows)
    seconds = sum(r[seconds_key] for r in rows)
    return images / seconds if seconds else None


# -- the figures ----------------------------------------------------------------------------------

def figure1(s: Settings) -> dict[str, Any]:
    """Feature extraction, 10 epochs, whole process: tlreg (cold and warm cache) vs classic."""
    epochs = s.epochs or (1 if s.quick else 10)
    runs: list[dict[str, Any]] = []
    for model in s.models_for(["efficientnet_lite0", "resnet18"]):
        for rnd in range(s.runs):
            cache = s.work / f"fig1-cache-{model.key}-{rnd}"  # fresh per round
            if s.wanted("tlreg"):
                out = s.work / f"fig1-{model.key}-tlreg-{rnd}"
                runs.append(measure(s, 1, rnd, model, "tlreg",
                                    tlreg_train(s, model, "feature-extract", epochs, out),
                                    env={"TLREG_CACHE_DIR": str(cache)}, spawned=False,
                                    read=_read_run(out)))
            if s.wanted("classic"):
                js = s.work / f"fig1-{model.key}-classic-{rnd}.json"
                runs.append(measure(s, 1, rnd, model, "classic",
                                    baseline(s, "classic", model, "--mode", "feature-extract",
                                             "--epochs", str(epochs), "--json", str(js)),
                                    spawned=False, read=_read_json(js)))
            if s.wanted("tlreg-cv"):  # the default solver: the head fitted by CV, cold cache
                out = s.work / f"fig1-{model.key}-tlreg-cv-{rnd}"
                runs.append(measure(s, 1, rnd, model, "tlreg-cv",
                                    tlreg_train(s, model, "feature-extract", None, out),
                                    env={"TLREG_CACHE_DIR": str(s.work / f"fig1-cv-{rnd}")},
                                    spawned=False, read=_read_run(out)))
            if s.wanted("tlreg-warm") and cache.exists():
                out = s.work / f"fig1-{model.key}-tlreg-warm-{rnd}"
                runs.append(measure(s, 1, rnd, model, "tlreg-warm",
                                    tlreg_train(s, model, "feature-extract", epochs, out),
                                    env={"TLREG_CACHE_DIR": str(cache)}, spawned=False,
                                    read=_read_run(out)))
    for r in runs:
        res = r.get("result")
        if res is None:
            continue
        summary = res.get("summary", res)
        r["metrics"] = {"wall_s": r["wall_s"],
                        "final_val_accuracy": summary.get("val_accuracy",
                                                          summary.get("final_val_accuracy")),
                        "best_val_accuracy": summary.get("best_val_accuracy"),
                        "val_images": summary.get("val_images"),
                        "feature_cache": summary.get("feature_cache")}
    return {"epochs": epochs, "runs": runs}


def figure2(s: Settings) -> dict[str, Any]:
    """Fine-tuning training images/s: tlreg vs classic vs hand-tuned."""
    epochs = s.epochs or (2 if s.quick else 3)
    runs: list[dict[str, Any]] = []
    models = s.models_for(["efficientnet_lite0", "resnet18"])
    for model in models:
        for rnd in range(s.runs):
            if s.wanted("tlreg"):
                out = s.work / f"fig2-{model.key}-tlreg-{rnd}"
                runs.append(measure(s, 2, rnd, model, "tlreg",
                                    tlreg_train(s, model, "finetune", epochs, out),
                                    env={"TLREG_CACHE_DIR": str(s.work / "fig2-cache")},
                                    spawned=False, read=_read_run(out)))
            if (rnd == 0 and model == models[0] and not s.quick
                    and s.wanted("tlreg-compile")):
                # one run: compiling costs minutes on 2 cores; epoch 1 pays it, 2+ show the gain
                out = s.work / f"fig2-{model.key}-tlreg-compile"
                # a fresh inductor cache: a warm one (any earlier run) would hide the compile
                runs.append(measure(s, 2, rnd, model, "tlreg-compile",
                                    [*tlreg_train(s, model, "finetune", epochs, out), "--compile"],
                                    env={"TLREG_CACHE_DIR": str(s.work / "fig2-cache"),
                                         "TORCHINDUCTOR_CACHE_DIR": str(s.work / "inductor")},
                                    spawned=False, read=_read_run(out)))
            if s.base_tlreg and s.wanted("tlreg-base"):
                out = s.work / f"fig2-{model.key}-tlreg-base-{rnd}"
                argv = tlreg_train(s, model, "finetune", epochs, out)
                runs.append(measure(s, 2, rnd, model, "tlreg-base", [s.base_tlreg, *argv[1:]],
                                    env={"TLREG_CACHE_DIR": str(s.work / "fig2-base-cache"),
                                         "PYTHONPATH": ""},
                                    read=_read_run(out)))
            for loop in ("classic", "handtuned"):
                if s.wanted(loop):
                    js = s.work / f"fig2-{model.key}-{loop}-{rnd}.json"
                    runs.append(measure(s, 2, rnd, model, loop,
                                        baseline(s, loop, model, "--mode", "finetune",
                                                 "--epochs", str(epochs), "--json", str(js)),
                                        spawned=False, read=_read_json(js)))
    # tlreg's history times whole epochs (train + val); when it also records train_seconds,
    # every variant is compared on the training phase alone.
    tl_hist = [r["result"]["history"] for r in runs if r["variant"] == "tlreg" and "result" in r]
    key = ("train_seconds" if tl_hist and all(h and "train_seconds" in h[0] for h in tl_hist)
           else "seconds")
    for r in runs:
        if "result" in r:
            hist = r["result"]["history"]
            timed = all(key in h for h in hist)  # an older tlreg (tlreg-base) may time less
            r["metrics"] = {"images_per_second": after_first(hist, key) if timed else None,
                            # whole epochs (train + val): what every tlreg version records
                            "epoch_images_per_second_whole": after_first(hist, "seconds"),
                            "epoch_images_per_second": [h["images_per_second"] for h in hist],
                            "wall_s": r["wall_s"],
                            "compile_s": r["result"].get("summary", {}).get("compile_seconds")}
    return {"epochs": epochs, "seconds_key": key, "runs": runs,
            **({"base_tlreg": _base_tlreg(s.base_tlreg)} if s.base_tlreg else {})}


def _base_tlreg(exe: str) -> dict[str, Any]:
    """Which tlreg the tlreg-base variant ran: its executable, package folder and commit."""
    python = Path(exe).with_name("python")
    where = subprocess.run([str(python), "-c", "import pathlib, tlreg; "
                            "print(pathlib.Path(tlreg.__file__).parent)"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
    folder = where.stdout.strip()
    rev = subprocess.run(["git", "-C", folder or ".", "rev-parse", "HEAD"], capture_output=True,
                         text=True) if folder else None
    return {"exe": exe, "package": folder or None,
            "commit": rev.stdout.strip() if rev and rev.returncode == 0 else None}


def figure3(s: Settings) -> dict[str, Any]:
    """The data pipeline alone: tlreg's loader (decoded cache off / on) vs ImageFolder + PIL."""
    import tlreg.data.decoded

    epochs = s.epochs or (2 if s.quick else 3)
    workers = os.cpu_count() or 1
    available = hasattr(tlreg.data.decoded, "benchmark_pipeline")
    runs: list[dict[str, Any]] = []
    for model in s.models_for(["efficientnet_lite0"]):
        common = ["--data", str(s.data), "--model", model.baseline, "--epochs", str(epochs),
                  "--batch-size", "32", "--workers", str(workers)]
        for rnd in range(s.runs):
            variants = [("imagefolder", ["python", "-m", "bench.baselines", "pipeline",
                                         "--quiet", *common])]
            if available:
                flags = {"tlreg": [], "tlreg-cache": ["--decoded-cache"],
                         "tlreg-stream": ["--stream"]}
                variants += [(v, ["python", "-m", "bench.perf", "_pipeline", *common, *f])
                             for v, f in flags.items()]
            for variant, argv in variants:
                if s.wanted(variant):
                    js = s.work / f"fig3-{model.key}-{variant}-{rnd}.json"
                    runs.append(measure(s, 3, rnd, model, variant, [*argv, "--json", str(js)],
                                        spawned=False, read=_read_json(js)))
    for r in runs:
        if "result" in r:
            rates = r["result"]["images_per_second"]
            later = rates[1:] or rates
            r["metrics"] = {"images_per_second": statistics.median(later),
                            "epoch_images_per_second": rates}
    note = None if available else (
        "tlreg.data.decoded.benchmark_pipeline is missing: only the ImageFolder + PIL baseline was "
        "measured")
    return {"epochs": epochs, "workers": workers, "runs": runs, "note": note}


def _have_onnx() -> bool:
    """Whether the [onnx] extra (onnx for the export, onnxruntime for predict) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def figure5(s: Settings) -> dict[str, Any]:
    """`tlreg predict`: one image in a new process (cold start), and a folder (batched); the
    torch path (a run directory) and the same run exported once to ONNX (onnxruntime)."""
    model = s.models_for(["efficientnet_lite0"])[0]
    run_dir = s.work / f"fig5-{model.key}-run"
    onnx_dir = s.work / f"fig5-{model.key}-onnx"
    setup = measure(s, 5, -1, model, "setup-train",
                    tlreg_train(s, model, "feature-extract", 1, run_dir),
                    env={"TLREG_CACHE_DIR": str(s.work / "fig5-cache")}, spawned=False,
                    read=_read_run(run_dir))
    folder = s.data / "val"
    one = next(p for p in sorted((folder / sorted(os.listdir(folder))[0]).iterdir())
               if p.suffix.lower() in {".jpg", ".jpeg"})
    n_batch = sum(1 for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    onnx_wanted = any(s.wanted(v) for v in ("onnx-one", "onnx-batch", "onnx-import-floor"))
    export = None
    onnx_note = None
    if setup["rc"] == 0 and onnx_wanted:
        if _have_onnx():  # the run exported once, checked against PyTorch on real val images
            export = measure(s, 5, -1, model, "setup-export",
                             ["tlreg", "export", str(run_dir), str(onnx_dir), "--format", "onnx",
                              "--check-images", str(folder)], spawned=False)
        else:
            onnx_note = "the [onnx] extra (onnx, onnxruntime) is not installed: no ONNX variants"
            print(f"  fig5: {onnx_note}", flush=True)
    onnx_ok = export is not None and export["rc"] == 0
    pred = ["tlreg", "predict", str(run_dir), "--device", s.device]
    opred = ["tlreg", "predict", str(onnx_dir / "model.onnx"), "--device", s.device]
    # (variant, argv, spawned, runs at all): one round interleaves all of them
    variants: list[tuple[str, list[str], bool, bool]] = [
        ("import-floor", ["python", "-c", "import torch, timm, torchvision"], True,
         not s.quick),
        ("onnx-import-floor", ["python", "-c", "import onnxruntime, numpy, PIL.Image"], True,
         onnx_ok),
        ("tlreg-one", [*pred, str(one)], True, True),
        ("onnx-one", [*opred, str(one)], True, onnx_ok),
        ("tlreg-batch", [*pred, str(folder), "--batch-size", "32"], not s.quick, True),
        ("onnx-batch", [*opred, str(folder), "--batch-size", "32"], not s.quick, onnx_ok),
        ("classic-one", ["python", "-m", "bench.baselines", "predict", "--model",
                         model.baseline, "--device", s.device, "--quiet", str(one)],
         not s.quick, True),
        ("classic-batch", ["python", "-m", "bench.baselines", "predict", "--model",
                           model.baseline, "--device", s.device, "--batch-size", "32",
                           "--quiet", str(folder)], not s.quick, True),
    ]
    runs: list[dict[str, Any]] = []
    if setup["rc"] == 0:
        for rnd in range(s.runs):
            for variant, argv, spawned, enabled in variants:
                if enabled and s.wanted(variant):
                    runs.append(measure(s, 5, rnd, model, variant, argv, spawned=spawned))
        if export is not None and not onnx_ok:
            runs.append(export)  # shown as a failed run
    else:
        runs.append(setup)
    walls = {(r["variant"], r["round"]): r["wall_s"] for r in runs if r["rc"] == 0}
    for r in runs:
        r["metrics"] = {"wall_s": r["wall_s"]}
        impl, _, kind = r["variant"].partition("-")
        single = walls.get((f"{impl}-one", r["round"]))
        if kind == "batch" and single is not None and r["wall_s"] > single:
            # marginal throughput: the images beyond the first, over the time they added
            r["metrics"]["images_per_second"] = (n_batch - 1) / (r["wall_s"] - single)
    return {"one_image": str(one), "batch_images": n_batch, "setup": setup,
            "setup_export": export, "onnx_note": onnx_note, "runs": runs}


# -- figure 3's tlreg side: runs tlreg.data.decoded.benchmark_pipeline in a fresh process -------

def worker(argv: list[str]) -> None:
    if not argv or argv[0] != "_pipeline":
        raise SystemExit(f"unknown worker {argv[:1]}")
    p = argparse.ArgumentParser(prog="python -m bench.perf _pipeline")
    for name in ("--data", "--model", "--json"):
        p.add_argument(name, required=True)
    for name in ("--epochs", "--batch-size", "--workers"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--decoded-cache", action="store_true")
    p.add_argument("--stream", action="store_true")
    a = p.parse_args(argv[1:])
    import resource

    from bench.baselines import model_data_config
    from tlreg.data.decoded import benchmark_pipeline

    rates = benchmark_pipeline(a.data, model_data_config(a.model), epochs=a.epochs,
                               batch_size=a.batch_size, workers=a.workers,
                               decoded_cache=a.decoded_cache, streamed=a.stream)
    Path(a.json).write_text(json.dumps({
        "impl": "tlreg", "decoded_cache": a.decoded_cache, "stream": a.stream,
        "images_per_second": list(rates),
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


# -- where and with what it ran -------------------------------------------------------------------

FIGURES: dict[int, Callable[[Settings], dict[str, Any]]] = {
    1: figure1, 2: figure2, 3: figure3, 5: figure5,
}
TITLES = {
    1: "Feature extraction, whole process (imports included)",
    2: "Fine-tuning: training images/s",
    3: "Data pipeline alone: images/s per epoch after the first",
    4: "Peak memory of every run",
    5: "`tlreg predict`: cold start on one image, and batched",
}


def run_figure(s: Settings, number: int, env: dict[str, Any]) -> Path:
    print(f"figure {number}: {TITLES[number]}", flush=True)
    t0 = time.perf_counter()
    body = FIGURES[number](s)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"figure": number, "title": TITLES[number], "timestamp": stamp,
              "quick": s.quick, "command": s.command, "data": str(s.data), "work": str(s.work),
              "device": s.device, "runs_per_variant": s.runs,
              "seconds": time.perf_counter() - t0, "environment": env, **body}
    s.results.mkdir(parents=True, exist_ok=True)
    path = s.results / f"fig{number}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"  raw results: {path}", flush=True)
    return path


# -- docs/benchmarks.md ---------------------------------------------------------------------------

def latest(results: Path, number: int) -> dict[str, Any] | None:
    files = sorted(results.glob(f"fig{number}-*.json"))
    if not files:
        return None
    data = json.loads(files[-1].read_text())
    data["_file"] = files[-1]
    return data


def _fmt(st: dict[str, float] | None, spec: str = ".1f", scale: float = 1.0) -> str:
    if not st:
        return "-"
    vals = [format(st[k] * scale, spec) for k in ("min", "median", "max")]
    return vals[1] if st["n"] == 1 else " / ".join(vals)


def _mib(st: dict[str, float] | None) -> str:
    return _fmt(st, ".0f", 1 / 1024)


def _variants(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in runs:
        if r["round"] >= 0:
            seen[(r["model"], r["variant"])] = None
    return list(seen)


def _of(runs: list[dict[str, Any]], model: str, variant: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["model"] == model and r["variant"] == variant]


def _vals(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r.get("metrics", {}).get(key) for r in runs if r["rc"] == 0]


def _header(data: dict[str, Any], results: Path) -> list[str]:
    env = data["environment"]
    v = env["versions"]
    rel = data["_file"].relative_to(ROOT) if data["_file"].is_relative_to(ROOT) \
        else data["_file"]
    runs = data["runs"]
    example = {}
    for r in runs:
        example.setdefault(r["variant"], r["argv"])
    cmds = [f"  - {name}: `{_short(' '.join(a), data)}`" for name, a in example.items()]
    shares = [r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None]
    busy = shares and max(shares) > OTHER_CPU_WARN
    return [
        f"- Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; "
        f"Python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"timm {v['timm']}, tlreg {v['tlreg']}"
        + "".join(f", {k}={val}" for k, val in env.get("malloc_env", {}).items()) + ".",
        f"- Commit `{(env['commit'] or 'unknown')[:12]}`"
        f"{' (uncommitted changes)' if env['dirty'] else ''}, {data['timestamp']}, "
        f"{data['runs_per_variant']} interleaved run(s) per variant"
        f"{', QUICK (tiny sizes, in process)' if data['quick'] else ''}; raw: `{rel}`.",
        *([f"- Other processes took {min(shares):.0%} to {max(shares):.0%} of the machine's "
           "CPU during the runs"
           + (": **other work was running; these timings are skewed**" if busy else "")
           + "."] if shares else []),
        f"- Command: `{data['command']}`; each run:",
        *cmds,
    ]


def _short(cmd: str, data: dict[str, Any]) -> str:
    cmd = cmd.replace(data["work"], "$TMP").replace(data["data"], "DATA")
    return cmd.replace(sys.executable, "python")


def _rows_table(header: list[str], rows: list[list[str]], text_columns: int = 2) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "| " + " | ".join("---" if i < text_columns else "---:"
                              for i in range(len(header))) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _verdict(st: dict[str, float] | None, target: float | None) -> str:
    if not st or target is None:
        return "-"
    return "met" if st["median"] >= target else "**not met**"


def render_fig1(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    out = [f"Feature extraction, {_n(d['epochs'], 'epoch')}, batch 32: `tlreg train --policy "
           "feature-extract` (fresh `TLREG_CACHE_DIR` per run; `tlreg-warm` reruns on the "
           "cache the cold run left; `tlreg-cv`: no `--epochs`, so the default solver fits the "
           "head by cross-validation, cold cache) vs the tutorial's loop (`classic`). Wall "
           "time of the whole process from the outside, imports included. Val accuracy: last "
           "epoch (best epoch).",
           ""]
    rows = []
    for model, variant in _variants(runs):
        rs = _of(runs, model, variant)
        acc = [(f, b) for f, b in zip(_vals(rs, "final_val_accuracy"),
                                      _vals(rs, "best_val_accuracy"), strict=True)
               if f is not None]
        acc_s = ", ".join(f"{f:.3f} ({b:.3f})" for f, b in acc) or "-"
        rows.append([model, variant, str(len(_vals(rs, "wall_s"))),
                     _fmt(stats(_vals(rs, "wall_s"))), acc_s,
                     _mib(stats([r["peak_rss_kb"] for r in rs])),
                     _mib(stats([r["tree_peak_rss_kb"] for r in rs]))])
    out += _rows_table(["model", "variant", "runs", "wall s (min / median / max)",
                        "val acc (best)", "peak RSS MiB", "tree RSS MiB"], rows)
    out += ["", *_ratio_table(runs, [
        ("tlreg", "classic", "wall_s", "speed-up (classic time / tlreg time)", 8.0, True),
        ("tlreg-warm", "classic", "wall_s", "speed-up, warm cache", None, True),
        ("tlreg-cv", "classic", "wall_s",
         "speed-up, default solver (head fitted by CV, no --epochs)", 8.0, True),
    ], d["quick"]), ""]
    for model in dict.fromkeys(r["model"] for r in runs):
        t = {r["round"]: r for r in _of(runs, model, "tlreg")}
        c = {r["round"]: r for r in _of(runs, model, "classic")}
        diffs = []
        for rnd in sorted(set(t) & set(c)):
            ma, mb = t[rnd].get("metrics", {}), c[rnd].get("metrics", {})
            if ma.get("best_val_accuracy") is not None and mb.get("best_val_accuracy") is not None:
                n = ma.get("val_images") or mb.get("val_images") or 0
                diffs.append(round((ma["best_val_accuracy"] - mb["best_val_accuracy"]) * n))
        if diffs:
            ok = "quick: n/a" if d["quick"] else \
                "met" if statistics.median(diffs) >= -1 else "**not met**"
            out.append(f"- {model}: best val accuracy, tlreg minus classic, in images, per pair: "
                       f"{diffs} (target: within one image or better: {ok})")
    return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ratio_table(runs: list[dict[str, Any]],
                 specs: list[tuple[str, str, str, str, float | None, bool]],
                 quick: bool = False) -> list[str]:
    """specs: (variant A, variant B, metric, label, target, lower is better)."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        for a, b, key, label, target, lower in specs:
            st = (pair_ratios(runs, model, (b, key), (a, key)) if lower
                  else pair_ratios(runs, model, (a, key), (b, key)))
            if st:
                rows.append([model, f"{a} vs {b}", label, _fmt(st, ".2f"), str(st["n"]),
                             f">= {target:g}x" if target else "-",
                             "quick: n/a" if quick and target else _verdict(st, target)])
    if not rows:
        return []
    return _rows_table(["model", "pair", "ratio", "min / median / max", "pairs", "target",
                        "status"], rows, text_columns=3)


def _stat_rows(runs: list[dict[str, Any]], metrics: list[tuple[str, str]]) -> list[list[str]]:
    """Per (model, variant): runs counted on the first metric, min / median / max of each
    metric, peak RSS."""
    rows = []
    for model, variant in _variants(runs):
        rs = _of(runs, model, variant)
        rows.append([model, variant, str(len(_vals(rs, metrics[0][0]))),
                     *(_fmt(stats(_vals(rs, key)), spec) for key, spec in metrics),
                     _mib(stats([r["peak_rss_kb"] for r in rs]))])
    return rows


def render_fig2(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    what = ("training phase alone" if d["seconds_key"] == "train_seconds"
            else "whole epochs (train + val: tlreg's history times whole epochs)")
    out = [f"Fine-tuning every layer, {_n(d['epochs'], 'epoch')}, batch 32, the model's input "
           "size (224 px for efficientnet_lite0 and resnet18): images/s of the "
           f"epochs after the first, timed over {what}. `classic`: the tutorial's loop (fp32, "
           "NCHW, 4 workers); `handtuned`: channels_last, persistent workers, no per-step "
           "sync.", ""]
    rows = _stat_rows(runs, [("images_per_second", ".1f"),
                             ("epoch_images_per_second_whole", ".1f")])
    out += _rows_table(["model", "variant", "runs", "images/s (min / median / max)",
                        "whole epochs: images/s", "peak RSS MiB"], rows)
    lite = {"efficientnet_lite0": 1.5}
    specs = [("tlreg", "classic", "images_per_second", "speed-up", None, False),
             ("tlreg", "handtuned", "images_per_second", "speed-up", 1.0, False),
             ("handtuned", "classic", "images_per_second", "speed-up", None, False),
             ("tlreg-compile", "tlreg", "images_per_second", "speed-up after compiling", None,
              False),
             ("tlreg", "tlreg-base", "epoch_images_per_second_whole",
              "speed-up, whole epochs (train + val)", None, False),
             ("tlreg", "tlreg-base", "wall_s", "speed-up, process wall time", None, True)]
    table = []
    for model in dict.fromkeys(r["model"] for r in runs):
        sub = [r for r in runs if r["model"] == model]
        model_specs = [(a, b, k, lab, lite.get(model) if (a, b) == ("tlreg", "classic") else t,
                        low) for a, b, k, lab, t, low in specs]
        rows_ = _ratio_table(sub, model_specs, d["quick"])
        table += rows_[2:] if table else rows_
    compiled = [(r["model"], r["metrics"]["compile_s"], r["wall_s"],
                 "TORCHINDUCTOR_CACHE_DIR" in r.get("env", {})) for r in runs
                if r["variant"] == "tlreg-compile" and r.get("metrics", {}).get("compile_s")]
    notes = [f"- {m}, `tlreg train --compile`: {c:.0f} s compiling (torch.compile's own count, "
             f"reported in summary.json) of a {w:.0f} s process, "
             + ("with a fresh inductor cache" if cold else
                "**with the inductor cache earlier runs left: not the cold cost**")
             for m, c, w, cold in compiled]
    base = d.get("base_tlreg")
    if base:
        notes.append(f"- `tlreg-base`: the same command run by another install, tlreg at commit "
                     f"`{(base['commit'] or 'unknown')[:12]}` (`{base['exe']}`); compared on "
                     "whole epochs, which every tlreg version times.")
    return [*out, "", *table, *(["", *notes] if notes else [])]


def render_fig3(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    out = [f"Decoding + augmentation + batching only (no model), train split, "
           f"{_n(d['epochs'], 'epoch')}, batch 32, {d['workers']} workers: median images/s "
           "of the epochs after the first. `imagefolder`: torchvision `ImageFolder` + PIL + "
           "the tutorial's train transforms; `tlreg` / `tlreg-cache` / `tlreg-stream`: "
           "`tlreg.data.decoded.benchmark_pipeline` with the decoded-image cache off / in memory "
           "/ streamed (decoded every epoch in the workers, batched augmentation).", ""]
    if d.get("note"):
        out += [f"**Not complete:** {d['note']}.", ""]
    rows = []
    for model, variant in _variants(runs):
        rs = _of(runs, model, variant)
        per_epoch = "; ".join(", ".join(f"{x:.0f}" for x in v)
                              for v in _vals(rs, "epoch_images_per_second") if v)
        rows.append([model, variant, str(len(_vals(rs, "images_per_second"))),
                     _fmt(stats(_vals(rs, "images_per_second"))), per_epoch,
                     _mib(stats([r["peak_rss_kb"] for r in rs]))])
    out += _rows_table(["data config", "variant", "runs", "images/s (min / median / max)",
                        "per epoch, each run", "peak RSS MiB"], rows)
    ratios = _ratio_table(runs, [
        ("tlreg", "imagefolder", "images_per_second", "speed-up", 3.0, False),
        ("tlreg-cache", "imagefolder", "images_per_second", "speed-up", 3.0, False),
        ("tlreg-stream", "tlreg", "images_per_second", "speed-up", None, False)],
        d["quick"])
    return [*out, "", *ratios]


def render_fig5(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    out = [f"A run directory trained by `tlreg train` (1 epoch, feature-extract), then: "
           f"`tlreg predict RUN` on one image (`-one`: a cold start: a new process, imports, "
           f"model load, one prediction) and on the {d['batch_images']} val images (`-batch`, "
           "batch 32). `classic-*`: the tutorial's `visualize_model_predictions` for one image, "
           "a `DataLoader` for the folder (the model's head is untrained: same cost). "
           "`import-floor`: `python -c 'import torch, timm, torchvision'` alone. `onnx-*`: the "
           "same run exported once (`tlreg export RUN OUT --format onnx`, fp32, dynamic batch, "
           "not timed), then `tlreg predict OUT/model.onnx` on the same image and folder: "
           "onnxruntime, NumPy and Pillow, no torch or timm imported. `onnx-import-floor`: "
           "`python -c 'import onnxruntime, numpy, PIL.Image'` alone. Batched images/s "
           "is marginal: (images - 1) / (batch wall - one-image wall), pair by pair.", ""]
    if d.get("onnx_note"):
        out += [f"**Not complete:** {d['onnx_note']}.", ""]
    rows = _stat_rows(runs, [("wall_s", ".2f"), ("images_per_second", ".1f")])
    out += _rows_table(["model", "variant", "runs", "wall s (min / median / max)",
                        "images/s", "peak RSS MiB"], rows)
    ratios = _ratio_table(runs, [
        ("tlreg-one", "classic-one", "wall_s", "speed-up (classic time / tlreg time)", None,
         True),
        ("tlreg-batch", "classic-batch", "images_per_second", "speed-up", None, False),
        ("onnx-one", "tlreg-one", "wall_s", "speed-up (tlreg time / onnx time)", None, True),
        ("onnx-batch", "tlreg-batch", "images_per_second", "speed-up", None, False)])
    notes = []
    for model in dict.fromkeys(r["model"] for r in runs):
        cold = stats(_vals(_of(runs, model, "onnx-one"), "wall_s"))
        if cold:
            ok = "quick: n/a" if d["quick"] else \
                "met" if cold["median"] < 1.0 else "**not met**"
            notes.append(f"- {model}, `tlreg predict model.onnx` on one image: median cold "
                         f"start {cold['median']:.2f} s (target: under 1 s, the issue asks "
                         f"well under: {ok})")
    return [*out, "", *ratios, *(["", *notes] if notes else [])]


def render_fig4(results: Path) -> list[str]:
    rows = []
    verdicts = []
    for number in (1, 2, 3, 5):
        d = latest(results, number)
        if d is None:
            continue
        for model, variant in _variants(d["runs"]):
            rs = _of(d["runs"], model, variant)
            rss = stats([r["peak_rss_kb"] for r in rs])
            tree = stats([r["tree_peak_rss_kb"] for r in rs])
            rows.append([str(number), model, variant, _mib(rss), _mib(tree)])
            if number == 1 and variant == "tlreg" and rss:
                worst = rss["max"]
                verdicts.append(f"- figure 1, {model}, tlreg feature-extract: highest peak RSS "
                                f"{worst / 1024:.0f} MiB (target: under 2048 MiB: "
                                f"{'met' if worst < 2 * GIB else '**not met**'})")
    if not rows:
        return ["Not measured yet: run figures 1, 2, 3 or 5."]
    return ["Peak memory of each run of the newest figures above. `peak RSS`: `ru_maxrss` of "
            "the run (its largest single process: the main one or a DataLoader worker); "
            "`tree RSS`: the highest sampled sum of the RSS of the whole process tree (main "
            "process + workers; an upper bound, as pages shared between them count once per "
            "process). "
            "In-process (quick) runs have neither.", "",
            *_rows_table(["figure", "model", "variant", "peak RSS MiB (min / median / max)",
                          "tree RSS MiB"], rows, text_columns=3), "", *verdicts]


RENDER = {1: render_fig1, 2: render_fig2, 3: render_fig3, 5: render_fig5}


def render(results: Path) -> str:
    lines = [BEGIN, "## Speed and memory: tlreg vs the classic and the hand-tuned loop", "",
             "Generated by `python -m bench.perf` (bench/perf.py; baselines in "
             "bench/baselines.py) from the newest raw results of each figure in "
             f"`{results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}`; "
             "rerun a figure to update it, do not edit by hand. Runs are interleaved "
             "(A B A B ...); ratios are computed pair by pair, then min / median / max; a "
             "target counts as met when the median ratio reaches it. `DATA` = "
             "`../shared/data/hymenoptera_data` (hymenoptera: 245 train files, one of them a "
             "GIF placeholder that `ImageFolder` does not list, 153 val).", ""]
    for number in (1, 2, 3, 4, 5):
        lines += [f"### {number}. {TITLES[number]}", ""]
        if number == 4:
            lines += [*render_fig4(results), ""]
            continue
        d = latest(results, number)
        if d is None:
            lines += [f"Not measured yet: `python -m bench.perf --figure {number}`.", ""]
            continue
        lines += [*RENDER[number](d), "", *_header(d, results), ""]
        failed = [r for r in d["runs"] if r["rc"] != 0]
        if failed:
            lines += [f"**{len(failed)} run(s) failed**; see the raw results.", ""]
    lines.append(END)
    return "\n".join(lines)


def write_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


# -- entry points ---------------------------------------------------------------------------------

def _quick_data(root: Path, per_class: int = 8) -> Path:
    """16 training images (8 per class) and 8 val images, as symlinks into the real data."""
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for cls in sorted(p.name for p in (DATA / split).iterdir() if p.is_dir()):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for src in sorted((DATA / split / cls).glob("*.jp*g"))[:n]:
                (dst / src.name).symlink_to(src)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("_"):
        worker(argv)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    p.add_argument("--figure", type=int, action="append", choices=[1, 2, 3, 4, 5],
                   help="figure to run (repeat for several; default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, results in a temp folder")
    p.add_argument("--runs", type=int, default=None, help="rounds per variant (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="override the figure's epochs")
    p.add_argument("--models", default=None, help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset, e.g. classic,handtuned")
    p.add_argument("--base-tlreg", default=None, metavar="EXE",
                   help="a `tlreg` executable of another install (an older commit in its own "
                        "virtual environment): figure 2 runs it too, as variant tlreg-base")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--device", default="cpu",
                   help="passed to tlreg and the baselines alike (cuda for the GPU figure)")
    p.add_argument("--results", default=None, help="raw JSON folder (default bench/results)")
    p.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md alone")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    a = p.parse_args(argv)
    if not Path(a.data).is_dir():
        print(f"no data at {a.data} (expected ../shared/data/hymenoptera_data)", file=sys.stderr)
        return 2
    figures = sorted(set(a.figure or [1, 2, 3, 4, 5]))
    work = Path(tempfile.mkdtemp(prefix="tlreg-bench-"))
    results = Path(a.results) if a.results else (work / "results" if a.quick else RESULTS)
    doc = work / "benchmarks.md" if a.quick else DOC
    if a.quick and DOC.exists():
        shutil.copy(DOC, doc)
    s = Settings(quick=a.quick, runs=a.runs or (1 if a.quick else 3),
                 data=_quick_data(work / "data") if a.quick else Path(a.data).resolve(),
                 work=work, results=results, doc=doc,
                 models=tuple(a.models.split(",")) if a.models else None, epochs=a.epochs,
                 variants=tuple(a.variants.split(",")) if a.variants else None,
                 command=" ".join(["python -m bench.perf", *argv]), device=a.device,
                 base_tlreg=a.base_tlreg)
    unknown = set(s.models or ()) - set(MODELS)
    if unknown:
        print(f"unknown model(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        env = environment()
        for number in figures:
            if number in FIGURES:
                run_figure(s, number, env)
        if not a.no_doc:
            write_doc(doc, render(results))
            print(f"rewrote the bench:perf section of {doc}")
    finally:
        if a.keep:
            print(f"kept the work folder {work}")
        else:  # quick mode's results and rendered doc live there too: --keep to look at them
            shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    for f in s.failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if s.failures else 0


def run(quick: bool) -> None:
    """Entry point for `python -m bench`: every figure; raises if any run failed."""
    if quick and not DATA.is_dir():  # a clone without ../shared beside it: nothing to time
        print(f"bench.perf: skipped, no photos at {DATA} (../shared/data/hymenoptera_data)")
        return
    rc = main(["--quick"] if quick else [])
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    sys.exit(main())
