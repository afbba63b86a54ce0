"""`check_head`: a head trains, gives the right logits and round-trips, on a CNN and a ViT."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlreg.testing._asserts import _check, _check_logits, _few, _roundtrip
from tlreg.testing._models import (
    CNN,
    VIT,
    _call_factory,
    _factory,
    _model_with,
    _quiet_rng,
    _small_input,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def check_head(name: str | Callable[..., nn.Module], /, **head_args: Any) -> None:
    """Check a head (a registered name, or a factory before it is registered).

    On a CNN (`timm:test_resnet`) and a ViT (`timm:test_vit`), random init, feature-extract:
    every head parameter trains; a training batch gives finite logits of shape (4, 3) and a
    backward pass gives finite gradients to the head and none to the frozen backbone; in eval
    mode the logits are deterministic and a single image works; the head's state dict
    round-trips through safetensors. The factory also honours another `num_classes`.
    """
    import torch
    import torch.nn.functional as F

    label = name if isinstance(name, str) else getattr(name, "__qualname__", repr(name))
    where = f"head {label!r}" + (f" with {head_args}" if head_args else "")
    factory = _factory(where, "head", name)
    num_classes = 3
    for backbone in (CNN, VIT):
        at = f"{where} on {backbone}"
        with _quiet_rng():
            model = _model_with(at, backbone, num_classes, head=name, head_args=head_args)
        head = model.head
        _check(isinstance(head, torch.nn.Module),
               f"{at}: factory returned {type(head).__name__}, not an nn.Module")
        params = dict(head.named_parameters())
        _check(params, f"{at}: the head has no parameters, so nothing would train")
        frozen = [n for n, p in params.items() if not p.requires_grad]
        _check(not frozen, f"{at}: head parameters do not train: {_few(frozen)}")

        size = _small_input(model)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, *size, generator=gen)
        y = torch.arange(4) % num_classes
        model.train()
        logits = model(x)
        _check_logits(at, logits, (4, num_classes), "training mode")
        F.cross_entropy(logits.float(), y).backward()
        for n, p in params.items():
            _check(p.grad is not None, f"{at}: head parameter {n!r} got no gradient")
            _check(bool(torch.isfinite(p.grad).all()),
                   f"{at}: head parameter {n!r} got a non-finite gradient")
        leaked = [n for n, p in model.backbone.named_parameters() if p.grad is not None]
        _check(not leaked, f"{at}: frozen backbone parameters got gradients: {_few(leaked)}")

        model.eval()
        with torch.no_grad():
            first, second = model(x), model(x)
            single = model(x[:1])
        _check_logits(at, first, (4, num_classes), "eval mode")
        _check(torch.equal(first, second), f"{at}: eval-mode logits are not deterministic")
        _check_logits(at, single, (1, num_classes), "eval mode, one image")

        # Round trip: a second head from the same factory loads the saved tensors strictly.
        with _quiet_rng():
            twin = _call_factory(at, factory, model.feature_dim, num_classes, head_args)
        _roundtrip(at, head, twin)
        twin.eval()
        with torch.no_grad():
            feats = model.forward_features(x)
            _check(torch.equal(head(feats), twin(feats)),
                   f"{at}: a head restored from safetensors gives different logits")

    # The factory must use num_classes and in_features, not constants.
    with _quiet_rng():
        other = _call_factory(where, factory, 24, 7, head_args)
    other.eval()
    with torch.no_grad():
        out = other(torch.randn(5, 24, generator=torch.Generator().manual_seed(1)))
    _check_logits(f"{where} built for in_features=24, num_classes=7", out, (5, 7))

