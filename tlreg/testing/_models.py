"""The tiny models the checks build, and calling a factory the way tlreg would."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from tlreg.errors import TlregError
from tlreg.testing._asserts import _check, _tlreg_call

if TYPE_CHECKING:  # pragma: no cover
    from tlreg.models.transfer import TransferModel

#: The tiny random-init timm models heads and policies are checked on (no download).
CNN = "timm:test_resnet"
VIT = "timm:test_vit"


def _small_input(model: Any) -> tuple[int, ...]:
    """Heads and policies do not care about resolution: CNNs get 64 px (fast); ViTs need theirs."""
    size = tuple(model.data_config["input_size"])
    if getattr(model.backbone, "patch_embed", None) is not None:
        return size
    return (size[0], 64, 64)


def _factory(where: str, kind: str, name: str | Callable[..., Any]) -> Callable[..., Any]:
    if not isinstance(name, str):
        _check(callable(name), f"{where}: expected a registered name or a factory")
        return name
    from tlreg.registry import get

    return _tlreg_call(where, "is not registered or does not load", get, kind, name)


def _call_factory(where: str, factory: Callable[..., Any], in_features: int | None,
                  num_classes: int | None, args: Mapping[str, Any]) -> Any:
    head = in_features is not None
    try:
        return factory(in_features, num_classes, **args) if head else factory(**args)
    except (TypeError, ValueError, TlregError) as exc:
        hint = "" if args else (" (if it needs arguments, pass them: check_head(name, **args) / "
                                "check_policy(name, **args), or head_args=/policy_args= to "
                                "check_plugin)")
        raise AssertionError(f"{where}: factory failed with arguments {dict(args)}: "
                             f"{type(exc).__name__}: {exc}{hint}") from exc


def _model_with(where: str, backbone: str, num_classes: int, *,
                head: str | Callable[..., Any] = "linear", head_args: Mapping[str, Any] = (),
                policy: str | Callable[..., Any] = "feature-extract",
                policy_args: Mapping[str, Any] = ()) -> TransferModel:
    """A random-init TransferModel; an unregistered head factory is swapped in as tlreg would."""
    from tlreg.models.transfer import create_model

    model = _tlreg_call(
        where, "does not build through tlreg.create_model", create_model, backbone, num_classes,
        head=head if isinstance(head, str) else "linear",
        head_args=dict(head_args) if isinstance(head, str) else None,
        policy=policy if isinstance(policy, str) else "feature-extract",
        policy_args=dict(policy_args) if isinstance(policy, str) else None,
        pretrained=False,
    )
    if not isinstance(head, str):
        import torch

        module = _call_factory(where, head, model.feature_dim, num_classes, head_args)
        _check(isinstance(module, torch.nn.Module),
               f"{where}: factory returned {type(module).__name__}, not an nn.Module")
        model.head = module
        model.apply_plan(model.plan)  # as create_model would: the new head trains
    # An unregistered policy is left to the caller, who applies and checks its plans.
    return model


@contextlib.contextmanager
def _quiet_rng() -> Iterator[None]:
    """Seeded, and leaves the caller's global RNG state as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
