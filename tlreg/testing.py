"""Conformance kit: one call per registered name checks what tlreg relies on.

For plugin authors, in their own pytest suite::

    from tlreg.testing import check_plugin

    def test_conforms_to_tlreg():
        check_plugin("my-tlreg-plugin")

Every check builds through tlreg itself (`create_model`, `apply_policy`), so it tests the path
users take. A failure raises `AssertionError` with a message that names the entry and what is
wrong; a check that passes returns what it measured. The checks run on timm's tiny test models
(`timm:test_resnet`, `timm:test_vit`) where they can, so each takes about a second on a CPU.
torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import TlregError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from tlreg.models.policies import FreezePlan
    from tlreg.models.transfer import TransferModel

__all__ = [
    "BUILTIN_POLICY_ARGS",
    "CNN",
    "VIT",
    "BackboneReport",
    "check_all_builtins",
    "check_backbone",
    "check_head",
    "check_plugin",
    "check_policy",
]

#: The tiny random-init timm models heads and policies are checked on (no download).
CNN = "timm:test_resnet"
VIT = "timm:test_vit"

#: Arguments for built-in policies that have no usable defaults.
BUILTIN_POLICY_ARGS: dict[str, dict[str, Any]] = {"partial": {"train_last": 2}}

_KINDS = ("backbone", "head", "policy")


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


def _small_input(model: Any) -> tuple[int, ...]:
    """Heads and policies do not care about resolution: CNNs get 64 px (fast); ViTs need theirs."""
    size = tuple(model.data_config["input_size"])
    if getattr(model.backbone, "patch_embed", None) is not None:
        return size
    return (size[0], 64, 64)


# -- backbones -------------------------------------------------------------------------------


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


# -- heads -----------------------------------------------------------------------------------


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


# -- policies --------------------------------------------------------------------------------


def check_policy(name: str | Callable[..., Any], /, *, epochs: int = 4,
                 **policy_args: Any) -> list[FreezePlan]:
    """Check a freezing policy (a registered name, or a factory before it is registered).

    For each epoch on `timm:test_resnet`: the plan is valid (a FreezePlan with one known BN rule
    per stage and stage ids in range); after `apply_policy` and `model.train()` exactly the
    parameters of the stages the plan declares trainable require grad (BN affine parameters
    under `frozen` never do); BN modules follow their rule (`frozen`/`eval`: eval mode,
    `train`: training mode); a training step moves no frozen parameter and no running statistic
    of a `frozen`/`eval` BN. Then, for several stage counts, `plan` must be a pure function of
    (num_stages, epoch). Returns the plans for the test model, one per epoch.
    """
    import torch
    import torch.nn.functional as F

    from tlreg.models.policies import Policy
    from tlreg.models.transfer import _BN

    label = name if isinstance(name, str) else getattr(name, "__qualname__", repr(name))
    where = f"policy {label!r}" + (f" with {policy_args}" if policy_args else "")
    factory = _factory(where, "policy", name)
    policy = _call_factory(where, factory, None, None, policy_args)
    _check(isinstance(policy, Policy),
           f"{where}: factory returned {type(policy).__name__}, not a tlreg Policy "
           f"(needs a str `name` and plan(num_stages, epoch) -> FreezePlan)")
    _check(isinstance(policy.name, str) and policy.name,
           f"{where}: policy.name must be a non-empty str, got {policy.name!r}")

    with _quiet_rng():
        model = _model_with(where, CNN, 3, policy=name, policy_args=policy_args)
    model.policy = policy  # the instance checked above
    n = model.num_stages
    bn_modules = {m: mod for m, mod in model.backbone.named_modules() if isinstance(mod, _BN)}
    size = _small_input(model)
    gen = torch.Generator().manual_seed(0)
    plans = []
    for epoch in range(epochs):
        at = f"{where}, epoch {epoch} of a {n}-stage model"
        declared = _plan(where, policy, n, epoch)
        _tlreg_call(at, "cannot be applied", model.apply_policy, epoch)
        model.train()
        trainable = set(declared.trainable)

        # requires_grad per stage, as declared.
        bn_rule = {m: declared.bn[model._stage_of_module(m, mod)] for m, mod in bn_modules.items()}
        frozen_affine = {f"{m}.{p}" for m, mod in bn_modules.items() if bn_rule[m] == "frozen"
                         for p, _ in mod.named_parameters(recurse=False)}
        wrong: list[str] = []
        for stage in range(n):
            params = [(pn, p) for pn, p in model.backbone.named_parameters()
                      if model.stage_of[pn] == stage]
            on = [pn for pn, p in params if p.requires_grad and
                  (stage not in trainable or pn in frozen_affine)]
            off = [pn for pn, p in params if not p.requires_grad and
                   stage in trainable and pn not in frozen_affine]
            title = f"stage {stage} ({model.stage_names[stage]})"
            if on:
                why = ("has BatchNorm rule 'frozen'" if stage in trainable
                       else "is declared frozen")
                wrong.append(f"{title} {why}, but {len(on)} parameters require grad: {_few(on)}")
            if off:
                wrong.append(f"{title} is declared trainable, but {len(off)} parameters are "
                             f"frozen: {_few(off)}")
        if wrong:
            again = policy.plan(n, epoch)
            hint = ("" if again == declared else
                    f" (plan() is not a pure function of (num_stages, epoch): it returned "
                    f"{declared} and then {again}; tlreg may call it any number of times)")
            raise AssertionError(f"{at}: {'; '.join(wrong)}{hint}")
        head_frozen = [pn for pn, p in model.head.named_parameters() if not p.requires_grad]
        _check(not head_frozen, f"{at}: head parameters are frozen: {_few(head_frozen)}")

        # BN modes after model.train().
        for m, mod in bn_modules.items():
            rule = bn_rule[m]
            _check(mod.training == (rule == "train"),
                   f"{at}: BatchNorm {m!r} under rule {rule!r} is in "
                   f"{'training' if mod.training else 'eval'} mode after model.train()")

        # One training step: frozen things do not move.
        stats = {m: [b.clone() for b in mod.buffers(recurse=False)]
                 for m, mod in bn_modules.items() if bn_rule[m] != "train"}
        frozen_before = {pn: p.detach().clone() for pn, p in model.named_parameters()
                         if not p.requires_grad}
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        opt.zero_grad(set_to_none=True)
        x = torch.randn(4, *size, generator=gen)
        F.cross_entropy(model(x), torch.arange(4) % 3).backward()
        opt.step()
        moved = [pn for pn, p in model.named_parameters()
                 if pn in frozen_before and not torch.equal(p, frozen_before[pn])]
        _check(not moved, f"{at}: frozen parameters changed in a training step: {_few(moved)}")
        drifted = [m for m, before in stats.items()
                   if not all(torch.equal(a, b) for a, b in
                              zip(bn_modules[m].buffers(recurse=False), before, strict=True))]
        _check(not drifted, f"{at}: running statistics of BatchNorm under a 'frozen'/'eval' "
               f"rule moved in a training forward: {_few(drifted)}")
        plans.append(declared)

    for stages in (1, 3, n, 12):  # any stage count; the same answer every time
        for epoch in range(epochs):
            first = _plan(where, policy, stages, epoch)
            second = _plan(where, policy, stages, epoch)
            _check(first == second,
                   f"{where}: plan({stages}, {epoch}) is not a pure function of (num_stages, "
                   f"epoch): it returned {first} and then {second}")
    return plans


def _plan(where: str, policy: Any, num_stages: int, epoch: int) -> FreezePlan:
    """One call of `policy.plan`, checked for shape and values."""
    from tlreg.models.policies import BN_RULES, FreezePlan

    at = f"{where}: plan({num_stages}, {epoch})"
    try:
        plan = policy.plan(num_stages, epoch)
    except Exception as exc:
        raise AssertionError(f"{at} raised {type(exc).__name__}: {exc}") from exc
    _check(isinstance(plan, FreezePlan), f"{at} returned {type(plan).__name__}, not a FreezePlan")
    bad = [s for s in plan.trainable if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s < num_stages]
    _check(not bad, f"{at}: trainable stages must be ints in 0..{num_stages - 1}, got {bad}")
    _check(len(plan.bn) == num_stages,
           f"{at}: {len(plan.bn)} BatchNorm rules for {num_stages} stages")
    rules = sorted({str(r) for r in plan.bn if r not in BN_RULES})
    _check(not rules, f"{at}: unknown BatchNorm rules {rules}; each must be one of "
           f"{', '.join(BN_RULES)}")
    return plan


# -- whole distributions ---------------------------------------------------------------------


def check_plugin(dist_name: str, *, pretrained: bool = False,
                 head_args: Mapping[str, Mapping[str, Any]] | None = None,
                 policy_args: Mapping[str, Mapping[str, Any]] | None = None,
                 kinds: tuple[str, ...] = _KINDS) -> dict[str, Any]:
    """Run the right check for every entry a distribution registers.

    Entries are addressed as `<dist>:<name>`, so a name another package also registers does not
    get in the way. `head_args` / `policy_args` map an entry name to the arguments to check it
    with (for entries without usable defaults). Returns {qualified name: result}.
    """
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
            results[qualified] = check_backbone(qualified, pretrained=pretrained)
        elif p.kind == "head":
            results[qualified] = check_head(qualified, **dict((head_args or {}).get(p.name, {})))
        else:
            results[qualified] = check_policy(qualified,
                                              **dict((policy_args or {}).get(p.name, {})))
    return results


def check_all_builtins(*, kinds: tuple[str, ...] = _KINDS) -> dict[str, Any]:
    """`check_plugin` over tlreg's own built-ins (random-init backbones: nothing downloaded)."""
    return check_plugin("tlreg", pretrained=False, policy_args=BUILTIN_POLICY_ARGS, kinds=kinds)


# -- helpers ---------------------------------------------------------------------------------


def _check(ok: Any, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _few(items: Any, n: int = 5) -> str:
    items = list(items)
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _tlreg_call(where: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into tlreg; any error (a plugin may raise anything) fails with its message kept."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise AssertionError(f"{where} {what}: {type(exc).__name__}: {exc}") from exc


def _check_logits(where: str, logits: Any, shape: tuple[int, ...], mode: str = "") -> None:
    import torch

    at = f"{where} ({mode})" if mode else where
    _check(isinstance(logits, torch.Tensor),
           f"{at}: forward returned {type(logits).__name__}, not a tensor")
    _check(tuple(logits.shape) == shape,
           f"{at}: logits have shape {tuple(logits.shape)}, expected {shape}")
    _check(logits.is_floating_point(), f"{at}: logits have dtype {logits.dtype}, not floating")
    _check(bool(torch.isfinite(logits).all()), f"{at}: logits are not all finite")


def _roundtrip(where: str, module: nn.Module, fresh: nn.Module) -> None:
    """Save `module`'s state dict as a checkpoint does, load it strictly into `fresh`."""
    import torch
    from safetensors.torch import load, save

    state = module.state_dict()
    try:
        blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    except Exception as exc:  # shared tensors, odd dtypes: safetensors says which
        raise AssertionError(f"{where}: state dict does not save as safetensors: "
                             f"{type(exc).__name__}: {exc}") from exc
    restored = load(blob)
    differ = [k for k, v in state.items() if k not in restored
              or restored[k].dtype != v.dtype or not torch.equal(restored[k], v.cpu())]
    _check(not differ, f"{where}: tensors changed in a safetensors round trip: {_few(differ)}")
    try:
        fresh.load_state_dict(restored, strict=True)
    except RuntimeError as exc:
        raise AssertionError(f"{where}: a fresh instance does not load the saved state dict "
                             f"strictly: {exc}") from exc


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

