"""Name resolution: `resnet50`, `timm:resnet50.a1_in1k`, `pkg:name`, with clear errors.

Names are plain. `timm:` is reserved for raw timm models. When two packages register the same
name, the bare name is an error that names both and `<distribution>:<name>` picks one.
"""

from __future__ import annotations

import difflib
from typing import Any

from tlreg.errors import UnknownNameError, UsageError
from tlreg.plugins import Plugin, find_plugins, load, normalize_dist, try_load

TIMM_PREFIX = "timm:"


def _suggest(name: str, choices: list[str]) -> str:
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
        hint = _suggest(bare, known)
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


def get_backbone(name: str) -> Any:
    """A BackboneSpec for a registered name, or for any timm model as `timm:<name>[.<tag>]`."""
    if name.startswith(TIMM_PREFIX):
        from tlreg.backbones import timm_spec

        return timm_spec(name.removeprefix(TIMM_PREFIX))
    return get("backbone", name)


def get_head(name: str) -> Any:
    return get("head", name)


def get_policy(name: str) -> Any:
    return get("policy", name)
