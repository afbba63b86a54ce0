"""Any head fitted to its CV-chosen optimum on cached features: `fit_head`.

A linear head is tlreg.engine.solver's convex problem; any other head (mlp, cosine, a
plugin's) gets AdamW steps on the features, its weight decay and step count chosen by
cross-validation on the training features the same honest way (`cv_steps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tlreg.engine import objective
from tlreg.engine.solver import (
    DEFAULT_WEIGHT_DECAYS,
    HeadFit,
    choose_point,
    cv_linear,
    fold_scores,
    moments,
    num_folds,
    stratified_folds,
)

__all__ = ["cv_steps", "fit_head"]


def _first_linear(head: nn.Module) -> nn.Linear | None:
    """The head's first layer when it is a Linear (after dropouts): where a fold is exact."""
    for module in head.modules() if isinstance(head, nn.Sequential) else [head]:
        if isinstance(module, nn.Sequential):
            continue
        if isinstance(module, (nn.Dropout, nn.Identity)):
            continue
        return module if isinstance(module, nn.Linear) else None
    return None


def _train_steps(head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, wd: float,
                 steps: int, batch: int, seed: int, label_smoothing: float,
                 at: Sequence[int] = (), on: Callable[[int], None] | None = None,
                 class_weight: torch.Tensor | None = None) -> None:
    """AdamW at a constant rate, seeded minibatches; `on(step)` at each step in `at`."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr,
                            weight_decay=wd)
    head.train()
    order = torch.empty(0, dtype=torch.long)
    marks = set(at)
    for step in range(1, steps + 1):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[:batch].to(x.device), order[batch:]
        loss = objective.loss(head(x[idx]), y[idx], label_smoothing, weight=class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in marks and on is not None:
            head.eval()
            with torch.no_grad():
                on(step)
            head.train()


def cv_steps(make_head: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, *,
             lr: float, batch: int = 32, folds: int = 5, seed: int = 0,
             weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
             max_epochs: int = 32, label_smoothing: float = 0.0,
             class_weight: torch.Tensor | None = None) -> HeadFit:
    """Any head: AdamW steps on cached features, (weight decay, steps) chosen by k-fold CV.

    The budget is `max_epochs` passes over the data (at least 200 steps), checked at 1/8,
    1/4, 1/2 and all of it; the head is then trained on all of (x, y) with the choice. Up to 3
    folds: each choice trains a fresh head per fold, which costs more than a convex solve.
    Features are standardised when the head starts with a Linear layer (folded into it).
    """
    import time

    t0 = time.perf_counter()
    y = y.detach().long()
    x = x.detach().float()
    probe = make_head()
    standardise = _first_linear(probe) is not None
    per_epoch = max(1, math.ceil(len(x) / batch))
    total = max(200, max_epochs * per_epoch)
    marks = sorted({max(1, total // 8), max(1, total // 4), max(1, total // 2), total})
    k = num_folds(y, min(folds, 3))

    def scaled(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
        if not standardise:
            return [train, *others]
        mean, std = moments(train)
        return [(t - mean) / std for t in (train, *others)]

    path: list[dict[str, float]] = []
    if k >= 2:
        fold_of = stratified_folds(y, k, seed).to(x.device)
        for wd in weight_decays:
            correct = {m: 0.0 for m in marks}
            loss = {m: 0.0 for m in marks}
            for f in range(k):
                tr, te = fold_of != f, fold_of == f
                xtr, xte = scaled(x[tr], x[te])
                torch.manual_seed(seed + f)
                head = make_head().to(x.device)

                def score(step: int, head: nn.Module = head, xte: torch.Tensor = xte,
                          yte: torch.Tensor = y[te], correct: dict[int, float] = correct,
                          loss: dict[int, float] = loss) -> None:
                    c, s = fold_scores(head(xte).float(), yte)
                    correct[step] += c
                    loss[step] += s

                _train_steps(head, xtr, y[tr], lr=lr, wd=wd, steps=total, batch=batch,
                             seed=seed + f, label_smoothing=label_smoothing, at=marks, on=score,
                             class_weight=class_weight)
            path += [{"weight_decay": wd, "steps": m, "cv_accuracy": correct[m] / len(y),
                      "cv_loss": loss[m] / len(y)} for m in marks]
        multi = objective.is_multi_label(y)
        chosen = choose_point(path, multi)
        wd, steps = chosen["weight_decay"], int(chosen["steps"])
        reason = (f"weight decay {wd:g}, {steps} steps: best {k}-fold CV "
                  + (f"loss {chosen['cv_loss']:.4f}" if multi else
                     f"accuracy {chosen['cv_accuracy']:.4f}") + f" of {len(path)} choices")
    else:
        wd, steps, k = weight_decays[len(weight_decays) // 2], total, 0
        chosen = {"cv_accuracy": None, "cv_loss": None}
        reason = "a class has fewer than 2 training images: no CV, the whole budget"
    (xs,) = scaled(x)
    torch.manual_seed(seed)
    head = make_head().to(x.device)
    _train_steps(head, xs, y, lr=lr, wd=wd, steps=steps, batch=batch, seed=seed,
                 label_smoothing=label_smoothing, class_weight=class_weight)
    head.eval()
    if standardise:
        mean, std = moments(x)
        first = _first_linear(head)
        assert first is not None
        with torch.no_grad():
            first.bias -= (first.weight / std) @ mean
            first.weight /= std
    return HeadFit(method="steps-cv", folds=k, cv_accuracy=chosen["cv_accuracy"],
                   cv_loss=chosen["cv_loss"], iterations=steps, weight_decay=wd, steps=steps,
                   standardised=standardise, path=tuple(path), reason=reason,
                   seconds=time.perf_counter() - t0,
                   state={k: v.detach().clone() for k, v in head.state_dict().items()})


def fit_head(head: nn.Module, make_head: Callable[[], nn.Module], x: torch.Tensor,
             y: torch.Tensor, num_classes: int, *, lr: float, batch: int, seed: int,
             label_smoothing: float = 0.0, folds: int = 5,
             class_weight: torch.Tensor | None = None) -> HeadFit:
    """Fit `head` in place to its CV-chosen optimum on (x, y); returns what was chosen.

    A head that is a Linear layer (after dropouts) is solved exactly (`cv_linear`); any other
    gets `cv_steps`, training fresh heads from `make_head`.
    """
    linear = _first_linear(head)
    is_linear = linear is not None and linear.bias is not None and sum(
        isinstance(m, nn.Linear) for m in head.modules()) == 1 and all(
        isinstance(m, (nn.Sequential, nn.Dropout, nn.Identity, nn.Linear))
        for m in head.modules())
    if is_linear:
        fit = cv_linear(x, y, num_classes, folds=folds, seed=seed,
                        label_smoothing=label_smoothing, class_weight=class_weight)
        with torch.no_grad():
            linear.weight.copy_(fit.state["weight"])
            linear.bias.copy_(fit.state["bias"])
        return fit
    fit = cv_steps(make_head, x, y, lr=lr, batch=batch, folds=folds, seed=seed,
                   label_smoothing=label_smoothing, class_weight=class_weight)
    head.load_state_dict(fit.state)
    return fit
