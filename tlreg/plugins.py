"""Plugin discovery through `importlib.metadata` entry points.

Modelled on flake8's finder: `find_plugins` reads package metadata and never imports; `load`
imports one entry on first use, wraps any failure with the package that caused it, and caches
the result. Built-ins register through the same groups from tlreg's own `pyproject.toml`.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable
from functools import cache
from importlib import metadata
from typing import Any, NamedTuple

from tlreg.errors import PluginError

GROUPS: dict[str, str] = {
    "backbone": "tlreg.backbones",
    "head": "tlreg.heads",
    "policy": "tlreg.policies",
}

STRICT_ENV = "TLREG_STRICT_PLUGINS"
DISABLE_ENV = "TLREG_DISABLE_PLUGINS"


class Plugin(NamedTuple):
    """One entry point, described from metadata alone."""

    kind: str  # "backbone" | "head" | "policy"
    name: str
    dist: str  # normalised distribution name, as pip compares them
    version: str
    value: str  # "module:attribute"

    @property
    def qualified_name(self) -> str:
        return f"{self.dist}:{self.name}"


class PluginWarning(UserWarning):
    """A plugin failed to load and was skipped (set TLREG_STRICT_PLUGINS=1 to fail instead)."""


def normalize_dist(name: str) -> str:
    """PEP 503 normalisation: `tlreg_Efficientnet.lite` -> `tlreg-efficientnet-lite`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def disabled_dists() -> frozenset[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return frozenset(normalize_dist(d) for d in raw.split(",") if d.strip())


def find_plugins(kind: str | None = None) -> list[Plugin]:
    """Every registered entry (of one kind, or all), sorted; imports nothing."""
    kinds = [kind] if kind else list(GROUPS)
    blocked = disabled_dists()
    found: set[Plugin] = set()
    for k in kinds:
        # entry_points() already yields each distribution once, even if it sits on sys.path twice.
        for ep in metadata.entry_points(group=GROUPS[k]):
            dist = ep.dist
            # A METADATA file without a Name must not break discovery for every package.
            dist_name = normalize_dist((dist.metadata.get("Name") if dist else None) or "unknown")
            if dist_name in blocked:
                continue
            version = dist.version if dist else "?"
            found.add(Plugin(k, ep.name, dist_name, version, ep.value))
    return sorted(found, key=lambda p: (list(GROUPS).index(p.kind), p.name, p.dist))


def _check_backbone(obj: Any) -> bool:
    from tlreg.backbones import BackboneSpec

    return isinstance(obj, BackboneSpec)


_VALIDATORS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "backbone": (_check_backbone, "a tlreg.backbones.BackboneSpec"),
    "head": (callable, "a callable (in_features, num_classes, **args) -> nn.Module"),
    "policy": (callable, "a callable (**args) -> Policy"),
}


@cache
def load(plugin: Plugin) -> Any:
    """Import one entry and check its type; any failure names the package that caused it."""
    module_name, _, attr = plugin.value.partition(":")
    try:
        obj: Any = __import__(module_name, fromlist=["_"]) if module_name else None
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:  # a plugin may raise anything on import
        raise PluginError(
            f"{plugin.kind} {plugin.name!r} from package {plugin.dist} {plugin.version} "
            f"failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    check, expected = _VALIDATORS[plugin.kind]
    if not check(obj):
        raise PluginError(
            f"{plugin.kind} {plugin.name!r} from package {plugin.dist} {plugin.version} "
            f"is {type(obj).__name__}, expected {expected}"
        )
    return obj


_warned: set[Plugin] = set()


def try_load(plugin: Plugin) -> Any | None:
    """Load, or warn once and return None; in strict mode a failure raises."""
    try:
        return load(plugin)
    except PluginError as exc:
        if strict():
            raise
        if plugin not in _warned:
            _warned.add(plugin)
            warnings.warn(f"{exc} (skipped; {STRICT_ENV}=1 makes this an error)",
                          PluginWarning, stacklevel=2)
        return None


def check_all(kind: str | None = None) -> list[tuple[Plugin, str | None]]:
    """Load every entry; (plugin, error message or None) for each. For `tlreg plugins --check`."""
    results = []
    for plugin in find_plugins(kind):
        try:
            load(plugin)
            results.append((plugin, None))
        except PluginError as exc:
            results.append((plugin, str(exc)))
    return results


def clear_cache() -> None:
    """Forget loaded entries (tests install and remove plugin packages at run time)."""
    load.cache_clear()
    _warned.clear()
    importlib.invalidate_caches()
