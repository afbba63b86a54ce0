"""Assertions the checks share: one failure message that names the entry and what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _check(ok: Any, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _few(items: Any, n: int = 5) -> str:
    items = list(items)
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _tlreg_call(where: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into tlreg; any error (a plugin may raise anything) fails with its message kept."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise AssertionError(f"{where} {what}: {type(exc).__name__}: {exc}") from exc


def _check_logits(where: str, logits: Any, shape: tuple[int, ...], mode: str = "") -> None:
    import torch

    at = f"{where} ({mode})" if mode else where
    _check(isinstance(logits, torch.Tensor),
           f"{at}: forward returned {type(logits).__name__}, not a tensor")
    _check(tuple(logits.shape) == shape,
           f"{at}: logits have shape {tuple(logits.shape)}, expected {shape}")
    _check(logits.is_floating_point(), f"{at}: logits have dtype {logits.dtype}, not floating")
    _check(bool(torch.isfinite(logits).all()), f"{at}: logits are not all finite")


def _roundtrip(where: str, module: nn.Module, fresh: nn.Module) -> None:
    """Save `module`'s state dict as a checkpoint does, load it strictly into `fresh`."""
    import torch
    from safetensors.torch import load, save

    state = module.state_dict()
    try:
        blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    except Exception as exc:  # shared tensors, odd dtypes: safetensors says which
        raise AssertionError(f"{where}: state dict does not save as safetensors: "
                             f"{type(exc).__name__}: {exc}") from exc
    restored = load(blob)
    differ = [k for k, v in state.items() if k not in restored
              or restored[k].dtype != v.dtype or not torch.equal(restored[k], v.cpu())]
    _check(not differ, f"{where}: tensors changed in a safetensors round trip: {_few(differ)}")
    try:
        fresh.load_state_dict(restored, strict=True)
    except RuntimeError as exc:
        raise AssertionError(f"{where}: a fresh instance does not load the saved state dict "
                             f"strictly: {exc}") from exc

