"""`check_backbone`: a registered backbone builds, groups every parameter, runs, round-trips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.testing._asserts import _check, _check_logits, _few, _roundtrip, _tlreg_call
from tlreg.testing._models import _quiet_rng

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class BackboneReport:
    """What `check_backbone` measured."""

    name: str
    provider: str  # the distribution that registers it
    timm_name: str
    feature_width: int
    num_stages: int
    num_layers: int
    stage_names: tuple[str, ...]
    num_parameters: int
    input_size: tuple[int, int, int]
    weights_source: str  # 'timm', 'file', 'loader' or 'random'
    weights_sha256: str | None  # canonical hash of the loaded weights; None when random



def check_backbone(name: str, *, pretrained: bool = False, num_classes: int = 3) -> BackboneReport:
    """Check a registered backbone: builds, groups every parameter, runs, round-trips.

    - builds through `create_model` with the spec's default head and policy;
    - reports a positive feature width that `forward_features` really returns;
    - every backbone parameter sits in exactly one stage and one layer, and stage and layer ids
      run densely from 0 with none empty;
    - a batch of 2 at the data config's input size gives finite logits of shape (2, num_classes);
    - with `pretrained`, the weights load strictly (the spec's source, re-read, equals the
      model's tensors, with nothing left over but the original classifier) and, when the spec
      pins `weights_sha256`, the loaded weights hash to it;
    - the full state dict round-trips through safetensors bitwise (a fresh model loads it
      strictly and gives the same logits).
    """
    import torch

    from tlreg.models import _timm
    from tlreg.models.backbones import BackboneSpec, get_backbone, weights_sha256
    from tlreg.models.transfer import create_model
    from tlreg.registry import TIMM_PREFIX, find

    where = f"backbone {name!r}"
    spec = _tlreg_call(where, "is not registered or does not load", get_backbone, name)
    _check(isinstance(spec, BackboneSpec), f"{where}: entry is {type(spec).__name__}, "
           f"expected a tlreg.models.backbones.BackboneSpec")
    _check(spec.lr > 0, f"{where}: default lr must be > 0, got {spec.lr}")
    _check(0 < spec.layer_decay <= 1,
           f"{where}: default layer_decay must be in (0, 1], got {spec.layer_decay}")
    provider = "timm" if name.startswith(TIMM_PREFIX) else find("backbone", name).dist

    with _quiet_rng():
        model = _tlreg_call(where, "does not build through tlreg.create_model", create_model,
                            name, num_classes, pretrained=pretrained)
    backbone = model.backbone

    # Feature width and the pooled features it promises.
    width = model.feature_dim
    _check(isinstance(width, int) and width > 0,
           f"{where}: feature width must be a positive int, got {width!r}")

    # Stages and layers: a partition of the backbone's parameters.
    names = [n for n, _ in backbone.named_parameters()]
    known = set(names)
    for kind, ids in (("stage", model.stage_of), ("layer", model.layer_of)):
        missing = [n for n in names if n not in ids]
        extra = [n for n in ids if n not in known]
        _check(not missing, f"{where}: {len(missing)} parameters are in no {kind}: "
               f"{_few(missing)}")
        _check(not extra, f"{where}: {kind} ids name unknown parameters: {_few(extra)}")
        used = sorted(set(ids.values()))
        _check(used == list(range(len(used))),
               f"{where}: {kind} ids must run 0..N-1 with none empty, got {used}")
    _check(model.num_stages >= 1 and model.num_layers >= model.num_stages,
           f"{where}: {model.num_stages} stages but {model.num_layers} layers "
           f"(layers are the finer grouping)")
    _check(len(model.stage_names) == model.num_stages,
           f"{where}: {len(model.stage_names)} stage names for {model.num_stages} stages")

    # Data config and a forward pass at its input size.
    cfg = model.data_config
    size = tuple(int(s) for s in cfg.get("input_size", ()))
    _check(len(size) == 3 and size[0] == 3 and min(size) > 0,
           f"{where}: data config input_size must be (3, H, W), got {cfg.get('input_size')!r}")
    for key in ("mean", "std"):
        value = tuple(cfg.get(key) or ())
        _check(len(value) == 3, f"{where}: data config {key} must have 3 values, got {value!r}")
    _check(all(s > 0 for s in cfg["std"]), f"{where}: data config std must be > 0")
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    _check(tuple(feats.shape) == (2, width),
           f"{where}: forward_features gave shape {tuple(feats.shape)}, expected (2, {width}) "
           f"from the reported feature width")
    _check_logits(where, logits, (2, num_classes))

    # Pretrained weights: strict, and pinned when the spec says so.
    digest = None
    if pretrained:
        digest = weights_sha256(backbone.state_dict())
        if spec.source in ("loader", "file"):
            _check_loaded_state(where, spec, backbone, _timm.classifier_prefixes(backbone))
        if spec.weights_sha256:
            _check(digest == spec.weights_sha256,
                   f"{where}: loaded weights hash to {digest}, the spec pins "
                   f"{spec.weights_sha256}")

    # Safetensors round trip of everything a checkpoint saves.
    with _quiet_rng():
        fresh = create_model(name, num_classes, pretrained=False)
    _roundtrip(where, model, fresh)
    fresh.eval()
    with torch.no_grad():
        again = fresh(x)
    _check(torch.equal(logits, again),
           f"{where}: a model restored from safetensors gives different logits")

    return BackboneReport(
        name=name, provider=provider, timm_name=spec.timm_name, feature_width=width,
        num_stages=model.num_stages, num_layers=model.num_layers,
        stage_names=tuple(model.stage_names),
        num_parameters=sum(p.numel() for p in backbone.parameters()),
        input_size=size,  # type: ignore[arg-type]
        weights_source=model.info.weights_source, weights_sha256=digest,
    )


def _check_loaded_state(where: str, spec: Any, backbone: nn.Module,
                        classifier: tuple[str, ...]) -> None:
    """Re-read the spec's weights and compare them with what the model holds."""
    import torch

    if spec.loader is not None:
        state = dict(spec.loader())
    else:
        from safetensors.torch import load_file

        state = load_file(spec.weights_file)
    own = backbone.state_dict()
    drop = tuple(p + "." for p in classifier)
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own and not k.startswith(drop)]
    _check(not missing and not extra,
           f"{where}: weights do not load strictly: missing {_few(missing)}, "
           f"unexpected {_few(extra)}")
    differ = [k for k, v in own.items() if not torch.equal(v, state[k].to(v.dtype))]
    _check(not differ, f"{where}: the model's tensors differ from its weights source: "
           f"{_few(differ)}")

