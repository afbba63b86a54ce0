"""Optimizer step: torch's default per-tensor loop vs the fused kernel tlreg asks for (issue 19).

On the CPU `torch.optim.AdamW` and `SGD` run their per-tensor Python loop unless told
otherwise (`foreach` is the CUDA default only). `build_optimizer` now asks for `fused=True`
where the optimizer has it; this measures one step over whole backbones' parameters (every
tensor with a gradient, as when fine-tuning), the three implementations interleaved round by
round in one process so a busy machine slows each alike.

    python -m bench.optim_step [--quick]    # prints the table and rewrites docs/benchmarks.md
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench._report import machine, write_section

SECTION = "optim-step"
MODELS = ("resnet18", "efficientnet_lite0", "vit_small_patch16_224")
IMPLEMENTATIONS = {"loop (torch default on CPU)": {"foreach": False},
                   "foreach": {"foreach": True}, "fused (tlreg)": {"fused": True}}


def measure(model_name: str, optimizer: str, rounds: int, steps: int) -> dict[str, Any]:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    # Real gradients, from one backward pass on a random batch: synthetic ones of a fixed scale
    # drove some of ResNet-18's optimizer state into denormal floats, where every
    # implementation ran 10-40x slower than on real training's numbers.
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    torch.nn.functional.cross_entropy(model(torch.randn(2, *size)), torch.tensor([0, 1])).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}  # tlreg's SGD default
    opts = {name: cls([p.detach().clone().requires_grad_() for p in params], lr=1e-3, **kw,
                      **extra)
            for name, kw in IMPLEMENTATIONS.items()}
    for opt in opts.values():
        for p, q in zip(opt.param_groups[0]["params"], params, strict=True):
            p.grad = q.grad.clone()
        opt.step()  # state allocated before timing
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            t = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - t) / steps * 1000)
    return {"model": model_name, "optimizer": optimizer, "tensors": len(params),
            "params": sum(p.numel() for p in params),
            "ms": {name: statistics.median(v) for name, v in times.items()},
            "rounds": rounds, "steps": steps}


def render(rows: list[dict[str, Any]]) -> str:
    names = list(IMPLEMENTATIONS)
    lines = ["## Optimizer step: the per-tensor loop vs fused (issue 19)", "",
             f"Machine: {machine()}. One `step()` over every parameter of the backbone (all with "
             "gradients, as when fine-tuning), median ms of "
             f"{rows[0]['rounds']} interleaved rounds of {rows[0]['steps']} steps. "
             "`build_optimizer` asks for the fused kernel (Adam, AdamW, SGD on the CPU) "
             "(`tlreg/engine/optim.py`); naming `foreach` or `fused` in the optimizer's "
             "arguments keeps the user's choice.", "",
             "| model | optimizer | tensors | params | " + " | ".join(names)
             + " | loop / fused |", "| --- | --- | ---: | ---: |" + " ---: |" * (len(names) + 1)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['tensors']} | {r['params']:,} | "
                     + " | ".join(f"{ms[n]:.1f}" for n in names)
                     + f" | {ms[names[0]] / ms[names[-1]]:.2f}x |")
    return "\n".join(lines)


def run(quick: bool = False) -> None:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = MODELS[:1] if quick else MODELS
    rows = [measure(m, o, rounds=2 if quick else 5, steps=2 if quick else 5)
            for m in models for o in ("adamw", "sgd")]
    text = render(rows)
    print(text)
    if not quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
