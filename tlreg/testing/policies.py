"""`check_policy`: a policy freezes what its plans declare, and plans are pure."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlreg.testing._asserts import _check, _few, _tlreg_call
from tlreg.testing._models import (
    CNN,
    _call_factory,
    _factory,
    _model_with,
    _quiet_rng,
    _small_input,
)

if TYPE_CHECKING:  # pragma: no cover
    from tlreg.models.policies import FreezePlan


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

