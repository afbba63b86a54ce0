"""Name resolution: `resnet50`, `timm:resnet50.a1_in1k`, `pkg:name`, with clear errors.

Names are plain. `timm:` is reserved for raw timm models. When two packages register the same
name, the bare name is an error that names both and `<distribution>:<name>` picks one.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from tlreg.errors import PluginError, UnknownNameError, UsageError
from tlreg.plugins import (
    STRICT_ENV,
    Plugin,
    PluginWarning,
    find_plugins,
    import_entry,
    normalize_dist,
    strict,
)
from tlreg.specs import BackboneSpec

TIMM_PREFIX = "timm:"

#: kind -> (check, what it must be): what an entry point of each group has to give.
VALIDATORS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "backbone": (lambda obj: isinstance(obj, BackboneSpec), "a tlreg.BackboneSpec"),
    "head": (callable, "a callable (in_features, num_classes, **args) -> nn.Module"),
    "policy": (callable, "a callable (**args) -> Policy"),
    "callback": (callable, "a callable (**args) -> tlreg.engine.callbacks.Callback"),
    "source": (callable, "a callable (location, val_split, seed) -> tlreg.data.sources.DataSplit"),
    "exporter": (callable, "a callable (model, out_dir, **kwargs) -> Path, see "
                           "tlreg.sharing.exporters.Exporter"),
}


@cache
def load(plugin: Plugin) -> Any:
    """Import one entry and check its type; any failure names the package that caused it."""
    try:
        obj = import_entry(plugin)
    except Exception as exc:  # a plugin may raise anything on import
        raise PluginError(
            f"{plugin.kind} {plugin.name!r} from package {plugin.dist} {plugin.version} "
            f"failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    check, expected = VALIDATORS[plugin.kind]
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


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def find(kind: str, name: str) -> Plugin:
    """The one plugin that provides `name` (plain or `dist:name`), loaded and checked."""
    dist, sep, bare = name.rpartition(":")
    plugins = [p for p in find_plugins(kind) if p.name == bare]
    if sep:
        plugins = [p for p in plugins if p.dist == normalize_dist(dist)]
    if not plugins:
        known = sorted({p.name for p in find_plugins(kind)})
        hint = suggest(bare, known)
        if kind == "backbone" and not hint:
            hint = f"; raw timm models are named '{TIMM_PREFIX}<name>', e.g. '{TIMM_PREFIX}{bare}'"
        where = f" in package {dist!r}" if sep else ""
        raise UnknownNameError(f"unknown {kind} {name!r}{where}{hint}")
    if len(plugins) > 1:
        # A broken duplicate is skipped with a warning rather than blocking the working one.
        plugins = [p for p in plugins if try_load(p) is not None] or plugins
    if len(plugins) > 1:
        options = ", ".join(f"'{p.qualified_name}'" for p in plugins)
        dists = " and ".join(f"{p.dist} {p.version}" for p in plugins)
        raise UsageError(f"{kind} {bare!r} is registered by {dists}; pick one: {options}")
    return plugins[0]


def get(kind: str, name: str) -> Any:
    """The registered object for `name`; raises PluginError naming the package if it is broken."""
    return load(find(kind, name))


def build(kind: str, name: str, args: Mapping[str, Any] | None, expect: type,
          what: str) -> Any:
    """`get(kind, name)(**args)`, checked: bad arguments are the user's, a wrong type the
    plugin's (named with its package)."""
    factory = get(kind, name)
    try:
        obj = factory(**dict(args or {}))
    except TypeError as exc:
        raise UsageError(f"{kind} {name!r}: bad arguments {dict(args or {})}: {exc}") from exc
    if not isinstance(obj, expect):
        raise PluginError(f"{kind} {name!r} from package {find(kind, name).dist} returned "
                          f"{type(obj).__name__}, not {what}")
    return obj


def get_head(name: str) -> Any:
    return get("head", name)


def get_policy(name: str) -> Any:
    return get("policy", name)
