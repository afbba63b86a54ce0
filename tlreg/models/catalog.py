"""Listing and describing backbones, for `tlreg backbones` and for notebooks."""

from __future__ import annotations

from typing import Any

from tlreg.models.backbones import get_backbone
from tlreg.plugins import find_plugins
from tlreg.registry import TIMM_PREFIX, find, try_load


def list_backbones(pattern: str = "*", pretrained: bool = False) -> list[dict[str, Any]]:
    """Registered names matching `pattern`; a `timm:` pattern lists timm's models instead.

    Plain listing reads metadata only. `pretrained=True` loads each spec to check that weights
    exist (a broken plugin is then skipped with a warning).
    """
    import fnmatch

    if pattern.startswith(TIMM_PREFIX):
        from tlreg.models import _timm

        names = _timm.list_models(pattern.removeprefix(TIMM_PREFIX) or "*", pretrained=pretrained)
        return [{"name": f"{TIMM_PREFIX}{n}", "distribution": "timm", "timm_name": n}
                for n in names]
    rows = []
    for p in find_plugins("backbone"):
        if not fnmatch.fnmatch(p.name, pattern):
            continue
        row: dict[str, Any] = {"name": p.name, "distribution": p.dist, "version": p.version}
        if pretrained:
            spec = try_load(p)
            if spec is None or not _has_weights(spec):
                continue
            row["timm_name"] = spec.arch
        rows.append(row)
    return rows


def _has_weights(spec: Any) -> bool:
    if spec.source != "timm":
        return True
    from tlreg.models import _timm

    return bool(_timm.list_models(spec.arch if spec.tag else spec.timm_name, pretrained=True))


def describe_backbone(name: str) -> dict[str, Any]:
    """Everything `backbones show` prints, built on a random-init model (nothing downloaded)."""
    spec = get_backbone(name)  # before torch and timm load: a wrong name fails fast
    dist = "timm" if name.startswith(TIMM_PREFIX) else find("backbone", name).dist
    from tlreg.models.transfer import create_model

    model = create_model(name, 2, head="linear", policy="finetune", pretrained=False)
    stage_params = [0] * model.num_stages
    stage_layers: list[set[int]] = [set() for _ in range(model.num_stages)]
    for pname, p in model.backbone.named_parameters():
        stage_params[model.stage_of[pname]] += p.numel()
        stage_layers[model.stage_of[pname]].add(model.layer_of[pname])
    members = model.stage_members()
    stages = [{"index": i, "name": model.stage_names[i], "parameters": stage_params[i],
               "layers": _span(stage_layers[i]), "modules": members[i]}
              for i in range(model.num_stages)]
    cfg = model.data_config
    return {
        "name": name, "distribution": dist, "summary": spec.summary,
        "timm_name": spec.timm_name, "tag": spec.tag, "weights_source": spec.source,
        "hub_id": model.info.hub_id,
        "parameters": sum(p.numel() for p in model.backbone.parameters()),
        "feature_width": model.feature_dim, "num_stages": model.num_stages,
        "num_layers": model.num_layers, "stages": stages,
        "data_config": {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation",
                                            "crop_pct") if k in cfg},
        "defaults": spec.defaults(),
    }


def _span(ids: set[int]) -> str:
    lo, hi = min(ids), max(ids)
    return str(lo) if lo == hi else f"{lo}-{hi}"
