"""Layer-wise learning rates: one optimizer for the whole run, and schedulers that keep the decay.

Parameter groups follow the model's **layers** (timm's fine `group_matcher` groups, in
`TransferModel.layer_of`). The head trains at the base `lr`; backbone layer `i` at
`lr * backbone_lr_mult * layer_decay ** (num_layers - i)`, floored at `min_lr`, so the layer just
below the head is at depth 1. Each layer is split into a decayed group and a no-weight-decay
group (1-D parameters: biases and norm weights; and the model's own `no_weight_decay()` names,
e.g. a ViT's `pos_embed` and `cls_token`).

Two choices matter for correctness:

* Every group carries a **real** `lr` and `initial_lr`. timm's `param_groups_layer_decay` stores
  only `lr_scale`, which plain torch schedulers ignore, so every group silently trains at the
  same rate. The ratio is kept as `lr_mult`, deliberately *not* `lr_scale`: timm's schedulers
  multiply any `lr_scale` they find into the (already scaled) rate and would apply the decay
  twice.
* All groups are built once, frozen parameters included. Freezing policies only flip
  `requires_grad`; torch optimizers skip parameters whose `.grad` is None. Adding groups
  mid-run breaks resume and schedulers, so the group list never changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from tlreg.errors import UsageError
from tlreg.models.transfer import TransferModel

__all__ = [
    "build_optimizer",
    "layer_lrs",
    "lr_plan",
    "optimizer_names",
]

HEAD = "head"

_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class _Group:
    """One parameter group before it becomes a torch dict: a layer's decayed or no-wd part."""

    name: str  # the layer's name: 'layer3' or 'head' (shared by its two groups)
    layer: int  # 0..num_layers-1 for the backbone, num_layers for the head
    stage: int | None  # backbone stage (None for the head)
    no_decay: bool
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


# -- parameter groups -----------------------------------------------------------------------


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names (relative to `module`) that must not be weight-decayed."""
    patterns = set()
    if hasattr(module, "no_weight_decay"):
        patterns = set(module.no_weight_decay())
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (p.ndim <= 1 or p_name == "bias" or isinstance(mod, _NORMS)
                    or any(fnmatch(full, pat) for pat in patterns)):
                names.add(full)
    return names


def _groups(model: TransferModel) -> list[_Group]:
    """The model's groups in a fixed order (layer 0 first, head last; decayed before no-wd).

    Depends only on the architecture, never on `requires_grad`, so a rebuilt optimizer
    always matches a saved optimizer state.
    """
    if not isinstance(model, TransferModel):
        raise UsageError(f"build_optimizer needs a tlreg TransferModel, got {type(model).__name__}")
    buckets: dict[tuple[int, int, bool], list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()

    def add(key: tuple[int, int, bool], name: str, p: nn.Parameter) -> None:
        if id(p) not in seen:  # tied weights: the first owner wins
            seen.add(id(p))
            buckets.setdefault(key, []).append((name, p))

    no_wd = _no_decay_names(model.backbone)
    for name, p in model.backbone.named_parameters():
        add((model.layer_of[name], model.stage_of[name], name in no_wd), f"backbone.{name}", p)
    head_no_wd = _no_decay_names(model.head)
    for name, p in model.head.named_parameters():
        add((model.num_layers, -1, name in head_no_wd), f"head.{name}", p)
    for name, p in model.named_parameters():  # anything else trains with the head
        if id(p) not in seen:
            add((model.num_layers, -1, p.ndim <= 1), name, p)

    groups = []
    for (layer, stage, no_decay), members in sorted(buckets.items()):
        groups.append(_Group(
            name=HEAD if layer == model.num_layers else f"layer{layer}",
            layer=layer, stage=None if stage < 0 else stage, no_decay=no_decay,
            param_names=tuple(n for n, _ in members), params=tuple(p for _, p in members),
        ))
    return groups


def _check_rates(lr: float, layer_decay: float, weight_decay: float, backbone_lr_mult: float,
                 min_lr: float) -> None:
    if not lr > 0:
        raise UsageError(f"lr must be > 0, got {lr}")
    if not 0 < layer_decay <= 1:
        raise UsageError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not weight_decay >= 0:
        raise UsageError(f"weight_decay must be >= 0, got {weight_decay}")
    if not backbone_lr_mult >= 0:
        raise UsageError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}")
    if not 0 <= min_lr <= lr:
        raise UsageError(f"min_lr must be in [0, lr={lr}], got {min_lr}")


def _layer_lr(layer: int, num_layers: int, lr: float, layer_decay: float,
              backbone_lr_mult: float, min_lr: float) -> float:
    depth = num_layers - layer  # head: 0, last backbone layer: 1
    if depth == 0:
        return lr
    return max(lr * backbone_lr_mult * layer_decay**depth, min_lr)


def optimizer_names() -> dict[str, type[Optimizer]]:
    """Every optimizer class in `torch.optim`, keyed by its lower-case name."""
    return {
        n.lower(): c for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, Optimizer) and c is not Optimizer
    }


def _optimizer_class(name: str) -> type[Optimizer]:
    classes = optimizer_names()
    cls = classes.get(name.lower())
    if cls is None:
        raise UsageError(f"unknown optimizer {name!r}; choose one of torch.optim's: "
                         f"{', '.join(sorted(classes))}")
    return cls


def build_optimizer(model: TransferModel, name: str = "adamw", lr: float = 1e-3,
                    layer_decay: float = 1.0, weight_decay: float = 0.01,
                    backbone_lr_mult: float = 1.0, min_lr: float = 0.0, momentum: float = 0.9,
                    **kwargs: Any) -> Optimizer:
    """A `torch.optim` optimizer (by name, case-insensitive) over the model's layer groups.

    Build it once per run, after moving the model to its device; freezing and unfreezing
    only flip `requires_grad`. `momentum` goes to optimizers that take one (SGD, RMSprop);
    other keyword arguments (`nesterov=True`, `betas=...`) go to the optimizer class.
    Each group has `params`, `lr`, `initial_lr`, `weight_decay` and the metadata `name`,
    `layer`, `stage` and `lr_mult` (its lr divided by `lr`).
    """
    _check_rates(lr, layer_decay, weight_decay, backbone_lr_mult, min_lr)
    cls = _optimizer_class(name)
    accepted = inspect.signature(cls).parameters
    if "momentum" in accepted and "momentum" not in kwargs:
        kwargs["momentum"] = momentum
    if weight_decay > 0 and "weight_decay" not in accepted:
        raise UsageError(f"optimizer {cls.__name__} has no weight decay; use weight_decay=0")
    param_groups = []
    for g in _groups(model):
        g_lr = _layer_lr(g.layer, model.num_layers, lr, layer_decay, backbone_lr_mult, min_lr)
        param_groups.append({
            "params": list(g.params), "lr": g_lr, "initial_lr": g_lr,
            "weight_decay": 0.0 if g.no_decay else weight_decay,
            "name": g.name, "layer": g.layer, "stage": g.stage, "lr_mult": g_lr / lr,
        })
    if _fuses(cls, accepted, kwargs, param_groups):
        try:  # one kernel over every tensor: bench/optim_step.py measures what it saves
            return cls(param_groups, lr=lr, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # a device or torch without the kernel
            pass
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build optimizer {cls.__name__} with {kwargs or 'defaults'} "
                         f"over {len(param_groups)} layer-wise parameter groups: {exc}") from exc


#: Optimizers whose fused kernel beats the per-tensor loop on the CPU (bench/optim_step.py:
#: AdamW 2.8-5.5x and SGD with momentum 1.5-1.9x on ResNet-18, Lite0 and ViT-S).
_FUSED_ON_CPU = ("Adam", "AdamW", "SGD")


def _fuses(cls: type, accepted: Any, kwargs: dict[str, Any],
           groups: list[dict[str, Any]]) -> bool:
    """Whether to ask for the optimizer's fused kernel: it has one, the user chose no
    implementation (`fused` / `foreach`), every parameter is a float on one CUDA device, or on
    the CPU for the optimizers whose kernel is faster there (`_FUSED_ON_CPU`).

    On the CPU torch's default is the per-tensor loop (foreach is a CUDA default only)."""
    if "fused" not in accepted or "fused" in kwargs or "foreach" in kwargs:
        return False
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    if len(devices) != 1 or not all(p.is_floating_point() for p in params):
        return False
    kind = next(iter(devices)).type
    return kind == "cuda" or (kind == "cpu" and cls.__name__ in _FUSED_ON_CPU)


def layer_lrs(optimizer: Optimizer) -> dict[str, float]:
    """Current lr per layer name ('layer0', ..., 'head'), e.g. for a history file."""
    out: dict[str, float] = {}
    for i, g in enumerate(optimizer.param_groups):
        out.setdefault(str(g.get("name", f"group{i}")), float(g["lr"]))
    return out


# -- the lr-plan table ----------------------------------------------------------------------


def lr_plan(model: TransferModel, lr: float = 1e-3, layer_decay: float = 1.0,
            weight_decay: float = 0.01, backbone_lr_mult: float = 1.0,
            min_lr: float = 0.0) -> list[dict[str, Any]]:
    """One row per layer (first backbone layer to head), as `build_optimizer` would make them.

    Each row: `layer`, `index`, `stage`, `modules`, `params`, `decay_params` (trained with
    `weight_decay`), `no_decay_params` (weight decay 0), `lr`, `lr_mult`, `weight_decay`.
    """
    _check_rates(lr, layer_decay, weight_decay, backbone_lr_mult, min_lr)
    members = model.layer_members()
    rows: dict[int, dict[str, Any]] = {}
    for g in _groups(model):
        row = rows.get(g.layer)
        if row is None:
            g_lr = _layer_lr(g.layer, model.num_layers, lr, layer_decay, backbone_lr_mult,
                             min_lr)
            row = rows[g.layer] = {
                "layer": g.name, "index": g.layer, "stage": [],
                "modules": _modules(model, members.get(g.layer, [HEAD])),
                "params": 0, "decay_params": 0,
                "no_decay_params": 0, "lr": g_lr, "lr_mult": g_lr / lr,
                "weight_decay": weight_decay,
            }
        stage = HEAD if g.stage is None else model.stage_names[g.stage]
        if stage not in row["stage"]:
            row["stage"].append(stage)
        row["params"] += g.numel
        row["no_decay_params" if g.no_decay else "decay_params"] += g.numel
    out = []
    for _, row in sorted(rows.items()):
        row["stage"] = "+".join(row["stage"])
        out.append(row)
    return out


def _modules(model: TransferModel, members: list[str]) -> list[str]:
    """Module names for display; a backbone's own `head` (ConvNeXt's `head.norm`) is spelled out
    so it is not taken for tlreg's new head."""
    if members == [HEAD] or HEAD not in members:
        return members
    own_head = {n.rsplit(".", 1)[0] for n in model.layer_of if n.startswith(HEAD + ".")}
    return sorted({*(m for m in members if m != HEAD), *own_head})
