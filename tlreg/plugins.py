"""Plugin discovery through `importlib.metadata` entry points.

Modelled on flake8's finder, and a leaf like it (it imports nothing of tlreg): `find_plugins`
reads package metadata and never imports; `import_entry` imports one entry. Checking what an
entry gives, caching it and naming the package that broke live in `tlreg.registry`. Built-ins
register through the same groups from tlreg's own `pyproject.toml`.
"""

from __future__ import annotations

import importlib
import os
import re
from importlib import metadata
from typing import Any, NamedTuple

GROUPS: dict[str, str] = {
    "backbone": "tlreg.backbones",
    "head": "tlreg.heads",
    "policy": "tlreg.policies",
    "callback": "tlreg.callbacks",
    "source": "tlreg.datasets",
    "exporter": "tlreg.exporters",
}

STRICT_ENV = "TLREG_STRICT_PLUGINS"
DISABLE_ENV = "TLREG_DISABLE_PLUGINS"


class Plugin(NamedTuple):
    """One entry point, described from metadata alone."""

    kind: str  # a key of GROUPS: "backbone", "head", "policy", "callback", "source", ...
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


def tlreg_requirement(dist: str) -> str | None:
    """The tlreg range distribution `dist` declares (`Requires-Dist: tlreg>=0.1,<0.2`), if any."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in metadata.requires(dist) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if normalize_dist(req.name) == "tlreg" and not req.marker:
            return str(req.specifier) or None
    return None


def version_conflicts() -> list[tuple[str, str, str, str]]:
    """(distribution, its version, the tlreg range it supports, the installed tlreg) for every
    plugin distribution whose declared range excludes the installed tlreg; reads metadata only.

    pip refuses such an install, but not a later upgrade of tlreg alone (it only warns), and
    not `--no-deps`; `tlreg plugins --check` reports it instead of a confusing failure later.
    """
    from packaging.specifiers import SpecifierSet

    installed = metadata.version("tlreg")
    conflicts = []
    for dist, version in sorted({(p.dist, p.version) for p in find_plugins()}):
        if dist == "tlreg":
            continue
        try:
            wanted = tlreg_requirement(dist)
        except metadata.PackageNotFoundError:
            continue
        if wanted and not SpecifierSet(wanted).contains(installed, prereleases=True):
            conflicts.append((dist, version, wanted, installed))
    return conflicts


def distributions() -> list[tuple[str, str, dict[str, int]]]:
    """(distribution, version, {kind: number of entries}) of every package with entries."""
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for p in find_plugins():
        kinds = rows.setdefault((p.dist, p.version), {})
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return [(d, v, k) for (d, v), k in sorted(rows.items())]


def import_entry(plugin: Plugin) -> Any:
    """Import one entry point's object (no check, no cache: the registry adds both)."""
    module_name, _, attr = plugin.value.partition(":")
    obj: Any = importlib.import_module(module_name) if module_name else None
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj
