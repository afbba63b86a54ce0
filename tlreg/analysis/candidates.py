"""Which backbones a `tlreg rank --backbones` list names: names, globs, timm:, random: controls.

Every name is resolved before any feature pass, so a typo costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tlreg.errors import UsageError
from tlreg.models.backbones import get_backbone
from tlreg.registry import TIMM_PREFIX

__all__ = ["RANDOM_PREFIX", "Candidate", "expand"]

RANDOM_PREFIX = "random:"
_GLOB = frozenset("*?[")


@dataclass(frozen=True)
class Candidate:
    """One backbone to score: `label` as shown, `backbone` as built and cached."""

    label: str
    backbone: str
    pretrained: bool = True
    control: bool = False  # a random-init control (random:NAME, --random-init)



def expand(patterns: str | Sequence[str], *, random_init: bool = False,
           pretrained: bool = True) -> tuple[Candidate, ...]:
    """Comma-separated names and glob patterns -> candidates, in order, each once.

    A pattern (`efficientnet_lite*`) globs the registered names (`tlreg backbones list`); a
    plain name must resolve (did-you-mean otherwise); `timm:<name>` passes through;
    `random:<name or pattern>` is a random-init control. `random_init` adds the control of the
    first pretrained candidate. Every name is checked before any work.
    """
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    entries = [e.strip() for item in items for e in item.split(",") if e.strip()]
    if not entries:
        raise UsageError("--backbones needs at least one name or pattern, e.g. "
                         "'efficientnet_lite*,resnet50'")
    out: list[Candidate] = []
    for entry in entries:
        control = entry.startswith(RANDOM_PREFIX)
        for name in _names(entry.removeprefix(RANDOM_PREFIX).strip() if control else entry):
            label = f"{RANDOM_PREFIX}{name}" if control and pretrained else name
            out.append(Candidate(label, name, pretrained=pretrained and not control,
                                 control=control and pretrained))
    if random_init:
        if not pretrained:
            raise UsageError("--random-init adds a random-init control beside pretrained "
                             "backbones; with --no-pretrained every candidate is one already")
        first = next((c for c in out if not c.control), None)
        if first is None:
            raise UsageError("--random-init needs a pretrained backbone to be the control of")
        out.append(Candidate(f"{RANDOM_PREFIX}{first.backbone}", first.backbone, False, True))
    seen: set[tuple[str, bool]] = set()
    unique = []
    for c in out:
        if (c.backbone, c.pretrained) not in seen:
            seen.add((c.backbone, c.pretrained))
            unique.append(c)
    return tuple(unique)


def _names(entry: str) -> list[str]:
    from tlreg.models.catalog import list_backbones

    if not entry:
        raise UsageError(f"{RANDOM_PREFIX} needs a backbone name, e.g. "
                         f"{RANDOM_PREFIX}efficientnet_lite0")
    globbed = bool(_GLOB & set(entry))
    if entry.startswith(TIMM_PREFIX):
        if globbed:
            raise UsageError(f"{entry!r}: timm: names are not expanded (timm has over a "
                             "thousand models); name one, e.g. timm:convnext_tiny (tlreg "
                             f"backbones list '{entry}' lists the matches)")
        get_backbone(entry)  # unknown timm model: one error with did-you-mean
        return [entry]
    if not globbed:
        get_backbone(entry)
        return [entry]
    names = list(dict.fromkeys(r["name"] for r in list_backbones(entry)))
    if not names:
        known = sorted({r["name"] for r in list_backbones("*")})
        raise UsageError(f"backbone pattern {entry!r} matches no registered backbone (known: "
                         f"{', '.join(known)}; raw timm models are named timm:<name>)")
    return names
