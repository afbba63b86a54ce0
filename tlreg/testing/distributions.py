"""`check_plugin`: the right check for every entry one distribution registers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tlreg.testing._asserts import _check

#: Arguments for built-in policies that have no usable defaults.
BUILTIN_POLICY_ARGS: dict[str, dict[str, Any]] = {"partial": {"train_last": 2}}

_KINDS = ("backbone", "head", "policy")


def check_plugin(dist_name: str, *, pretrained: bool = False,
                 head_args: Mapping[str, Mapping[str, Any]] | None = None,
                 policy_args: Mapping[str, Mapping[str, Any]] | None = None,
                 kinds: tuple[str, ...] = _KINDS) -> dict[str, Any]:
    """Run the right check for every entry a distribution registers.

    Entries are addressed as `<dist>:<name>`, so a name another package also registers does not
    get in the way. `head_args` / `policy_args` map an entry name to the arguments to check it
    with (for entries without usable defaults). Returns {qualified name: result}.
    """
    # The checks are looked up on the package at call time: a caller's own suite can stand in
    # for one (tests/test_conformance.py records the calls instead of running them).
    import tlreg.testing as kit
    from tlreg.plugins import find_plugins, normalize_dist
    from tlreg.registry import clear_cache

    clear_cache()  # see what is installed now
    dist = normalize_dist(dist_name)
    entries = [p for p in find_plugins() if p.dist == dist and p.kind in kinds]
    registered = sorted({p.dist for p in find_plugins()})
    _check(entries, f"distribution {dist_name!r} registers no tlreg "
           f"{'/'.join(kinds)} entries; is it installed (pip install -e .)? "
           f"Distributions with entries: {', '.join(registered) or 'none'}")
    results: dict[str, Any] = {}
    for p in entries:
        qualified = p.qualified_name
        if p.kind == "backbone":
            results[qualified] = kit.check_backbone(qualified, pretrained=pretrained)
        elif p.kind == "head":
            results[qualified] = kit.check_head(qualified,
                                                **dict((head_args or {}).get(p.name, {})))
        else:
            results[qualified] = kit.check_policy(qualified,
                                                  **dict((policy_args or {}).get(p.name, {})))
    return results


def check_all_builtins(*, kinds: tuple[str, ...] = _KINDS) -> dict[str, Any]:
    """`check_plugin` over tlreg's own built-ins (random-init backbones: nothing downloaded)."""
    return check_plugin("tlreg", pretrained=False, policy_args=BUILTIN_POLICY_ARGS, kinds=kinds)
