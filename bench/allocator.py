"""glibc's default allocator vs `reuse_freed_memory` on the CPU: a frozen forward pass and a
training step of whole backbones (issue 19).

glibc maps each allocation over its mmap threshold (at most 32 MB) afresh and unmaps it on
free, so a CNN's large activations are faulted in again on every pass. tlreg turns that off
for a run (`tlreg.engine.runtime.reuse_freed_memory`). Each measurement is a fresh process
(the heap's history is the thing measured), the two modes interleaved round by round; median
seconds per batch of 32 at 224 px after one warm-up batch, page faults and peak RSS of the
process.

    python -m bench.allocator [--quick]    # prints the table and rewrites docs/benchmarks.md
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from bench._report import ROOT, machine, write_section

SECTION = "allocator"
MODELS = ("efficientnet_lite0", "resnet18")
MODES = ("glibc default", "reuse_freed_memory (tlreg)")

CHILD = """
import contextlib, json, resource, statistics, sys, time, timm, torch
from tlreg.engine.runtime import reuse_freed_memory
model_name, job, mode, steps, batch = sys.argv[1:6]
steps, batch = int(steps), int(batch)
torch.manual_seed(0)
model = timm.create_model(model_name, num_classes=10).to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
times = []
with reuse_freed_memory("cpu") if mode == "reuse" else contextlib.nullcontext():
    for i in range(steps + 1):
        t = time.perf_counter()
        if job == "forward":
            with torch.inference_mode():
                model.eval()(x)
        else:
            torch.nn.functional.cross_entropy(model.train()(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": statistics.median(times[1:]), "faults": r.ru_minflt,
                  "peak_rss_mb": r.ru_maxrss / 1024}))
"""


def measure(model: str, job: str, mode: str, steps: int, batch: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, model, job, mode, str(steps), str(batch)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> None:
    models = ("test_efficientnet",) if quick else MODELS
    rounds, steps, batch = (1, 2, 4) if quick else (3, 5, 32)
    rows = []
    for model in models:
        for job in ("forward", "train step"):
            got: dict[str, list[dict[str, Any]]] = {"default": [], "reuse": []}
            for _ in range(rounds):
                for mode in got:
                    got[mode].append(measure(model, job.split()[0], mode, steps, batch))
            rows.append((model, job, {m: {k: statistics.median(r[k] for r in v)
                                          for k in v[0]} for m, v in got.items()}))
    lines = ["## CPU allocator: glibc's default vs reusing freed memory (issue 19)", "",
             f"`python -m bench.allocator` on {machine()}. A batch of {batch} at 224 px, "
             f"channels_last, fp32, random init (the speed is the pretrained one's); each "
             f"number the median of {rounds} fresh processes, the modes interleaved; seconds "
             f"per batch: the median of {steps} after a warm-up. `reuse_freed_memory` "
             "(`tlreg/engine/runtime.py`) wraps every `tlreg` run, feature pass and batched "
             "predict on the CPU.", "",
             "| model | job | glibc s | tlreg s | speed-up | glibc page faults | tlreg page "
             "faults | glibc peak RSS MB | tlreg peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, job, r in rows:
        d, t = r["default"], r["reuse"]
        lines.append(f"| {model} | {job} | {d['seconds']:.3f} | {t['seconds']:.3f} | "
                     f"{d['seconds'] / t['seconds']:.2f}x | {d['faults']:,.0f} | "
                     f"{t['faults']:,.0f} | {d['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if not quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
