"""Heads fitted to their optimum on cached features, with the regularisation chosen honestly.

When the backbone is frozen, training the head is cheap, so it is fitted to convergence:

* a **linear head** is multinomial logistic regression, a convex problem: full-batch L-BFGS (in
  float64) on standardised features, with the L2 strength C chosen by stratified k-fold
  cross-validation on the training features only, warm-started along the regularisation path
  from strong to weak;
* **any other head** (mlp, cosine, a plugin's) gets AdamW steps on the cached features, with the
  step budget and the weight decay chosen by the same folds (tlreg.engine.head_fit, which also
  holds `fit_head`, the one entry point for both).

The objective is scikit-learn's (``C * sum of cross-entropies + |W|^2 / 2``, bias not
penalised), divided by ``C * n`` for conditioning, so C means what it means there. The
standardisation is folded into the head's first linear layer (``W / s`` and ``b - W mu / s``),
so the head takes raw features and every artifact keeps working unchanged.

scikit-learn is not used here: it is an optional test dependency, works in NumPy off the device,
and its folds could not run under torch's determinism and DDP rules; it is the *reference* the
tests and `bench.accuracy` compare this solver with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tlreg.engine import objective

__all__ = [
    "DEFAULT_CS",
    "HeadFit",
    "cv_linear",
    "fit_logistic",
    "logistic_objective",
    "stratified_folds",
]

#: The regularisation path, strong to weak: C in 1e-4 .. 1e2, half a decade apart.
DEFAULT_CS: tuple[float, ...] = tuple(10 ** (e / 2) for e in range(-8, 5))
#: Weight decays tried for heads that are not linear (AdamW's decoupled decay).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-4, 1e-2, 1e-1)
_PATIENCE = 3  # path points past the best CV accuracy and loss before the path stops
#: L-BFGS curvature pairs the final fit keeps (the folds keep 20). Its tail to a gradient of
#: 1e-7 is where the fit spends its time on weakly separable features, and a longer memory
#: shortens it: 1,540 x 1,280 x 10 random-init features (float64, 1 thread), C=0.01: 974
#: iterations in 11.8 s with 20 pairs, 218 in 2.7 s with 100; C=1: 1,000 (the cap, not
#: converged) in 12.9 s, 408 in 6.3 s. Each pair costs torch's two-loop recursion six small
#: ops per iteration, which the folds' loose float32 fits do not win back (3.2 vs 6.7 ms an
#: iteration at C=0.03).
FINAL_HISTORY = 100
_HISTORY = 20  # every other fit's pairs, and the fewest any fit keeps
_HISTORY_BYTES = 256 * 2**20  # the pairs' memory (2 vectors each) stays under this
#: Gradient (max-abs, of the mean objective) the folds' float32 fits stop at: enough to rank C.
#: 1e-5 cost twice the iterations for the same choice: patches' random-init control (1,540 x
#: 1,280 x 10, 1 thread) 5,710 -> 2,925 iterations, 23.2 -> 14.4 s, every path point's CV
#: accuracy within one image and the same C; Lite0 983 -> 700 iterations, same C.
FOLD_TOL = 1e-4
FINAL_TOL = 1e-7  # the final float64 fit, whose head is the one exported


@dataclass(frozen=True)
class HeadFit:
    """What a fit chose and why; `record()` goes into summary.json."""

    method: str  # 'lbfgs-cv' or 'steps-cv'
    folds: int
    cv_accuracy: float | None
    cv_loss: float | None
    iterations: int
    seconds: float = 0.0
    C: float | None = None
    weight_decay: float | None = None
    steps: int | None = None
    standardised: bool = False
    path: tuple[dict[str, float], ...] = ()
    reason: str = ""
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    fold_accuracies: tuple[float, ...] = ()  # each fold's held-out accuracy at the chosen C

    def record(self) -> dict[str, Any]:
        keys = ("method", "folds", "cv_accuracy", "cv_loss", "iterations", "seconds", "C",
                "weight_decay", "steps", "standardised", "reason")
        return {k: getattr(self, k) for k in keys} | {"path": list(self.path)}


# -- folds and standardisation --------------------------------------------------------------


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Fold id (0..k-1) per sample: each class is shuffled (seeded) and dealt round-robin.

    Multi-label rows are dealt by their rarest label, so each class's images spread over the
    folds (a simple form of iterative stratification).
    """
    gen = torch.Generator().manual_seed(seed)
    labels = _strata(labels.cpu())
    fold = torch.empty(len(labels), dtype=torch.long)
    offset = 0
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold[idx] = (torch.arange(len(idx)) + offset) % k
        offset += len(idx)  # classes start where the last left off: folds stay balanced
    return fold


def _strata(labels: torch.Tensor) -> torch.Tensor:
    """One stratum per sample: its class, or its rarest label (-1: none) for 0/1 rows."""
    if not objective.is_multi_label(labels):
        return labels
    counts = labels.sum(0).float()
    rarity = torch.where(labels.bool(), counts, torch.full_like(counts, math.inf))
    rarest = rarity.argmin(1)
    return torch.where(labels.bool().any(1), rarest, torch.full_like(rarest, -1))


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns: 1


# -- the convex problem ---------------------------------------------------------------------


def logistic_objective(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       C: float, label_smoothing: float = 0.0,
                       class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """scikit-learn's objective divided by C*n: mean loss + |W|^2 / (2 C n).

    Multinomial for class indices; for 0/1 rows, one-vs-rest (`OneVsRestClassifier`'s sum of
    per-class binary objectives, each with the same C). `class_weight` weighs each image's loss
    by its class's weight (scikit-learn's `class_weight`), or is each class's `pos_weight`.
    """
    logits = x @ w.T + b
    penalty = w.pow(2).sum() / (2 * C * len(x))
    if objective.is_multi_label(y):
        data = F.binary_cross_entropy_with_logits(
            logits, objective.smoothed(y, label_smoothing).to(x.dtype), reduction="sum",
            pos_weight=class_weight)
        return data / len(x) + penalty
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
    if class_weight is not None:
        ce = ce * class_weight.to(ce)[y]
    return ce.mean() + penalty


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, *,
                 label_smoothing: float = 0.0,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 1000,
                 tol: float = 1e-9, class_weight: torch.Tensor | None = None,
                 history: int = _HISTORY) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(W, b, iterations) minimising `logistic_objective` by L-BFGS, in x's dtype and device.

    `history`: curvature pairs kept; over `_HISTORY`, capped so that they fit in 256 MiB (many
    classes times wide features).

    `y`: class indices (softmax), or 0/1 rows (independent sigmoids); the gradient has the
    same form for both, (p - q) x / n.
    """
    d = x.shape[1]
    if init is None:
        theta = torch.zeros(num_classes * (d + 1), dtype=x.dtype, device=x.device)
    else:
        theta = torch.cat([init[0].flatten(), init[1]]).to(x)
    theta.requires_grad_(True)
    cap = _HISTORY_BYTES // (2 * theta.numel() * theta.element_size())
    history = min(history, max(_HISTORY, cap))
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=history,
                            tolerance_grad=tol, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    n = len(x)
    multi = objective.is_multi_label(y)
    # Soft targets (label smoothing included): the loss is -sum(q log p) / n (for sigmoids,
    # summed with the negatives' -(1 - q) log(1 - p)).
    q = (objective.smoothed(y, label_smoothing).to(x.dtype) if multi else
         F.one_hot(y, num_classes).to(x.dtype) * (1 - label_smoothing)
         + label_smoothing / num_classes)
    cw = None if class_weight is None else class_weight.to(x)
    # Per image (one label): its class's weight; per entry (0/1 rows): pos_weight on positives.
    s = (None if cw is None else cw[y][:, None] if not multi else cw * q + (1 - q))

    def unpack(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:num_classes * d].view(num_classes, d), t[num_classes * d:]

    def closure() -> torch.Tensor:
        # The gradient by hand ((p - q) x / n + W / Cn): autograd's bookkeeping cost more
        # than the two matmuls on these small problems. Checked against autograd in the tests.
        with torch.no_grad():
            w, b = unpack(theta)
            z = x @ w.T + b
            if multi:
                data = F.binary_cross_entropy_with_logits(z, q, reduction="sum", pos_weight=cw)
                p = z.sigmoid()
                # d/dz of -(pw q log p + (1 - q) log(1 - p)) = (pw q + 1 - q) p - pw q
                g = (p - q) if s is None else s * p - cw * q
            else:
                logp = z.log_softmax(1)
                per = -(q * logp).sum(1)
                data, p = (per.sum() if s is None else (per * s[:, 0]).sum()), logp.exp()
                g = (p - q) if s is None else (p - q) * s
            loss = data / n + w.pow(2).sum() / (2 * C * n)
            g = g / n
            theta.grad = torch.cat([(g.T @ x + w / (C * n)).flatten(), g.sum(0)])
        return loss

    opt.step(closure)
    iterations = int(opt.state[theta].get("n_iter", 0)) if theta in opt.state else 0
    w, b = unpack(theta.detach())
    return w.clone(), b.clone(), iterations


def fold_scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(correct count, summed loss) on a held-out fold (tlreg.engine.objective's)."""
    return float(objective.correct(logits, y)), float(objective.loss(logits, y, reduction="sum"))


def choose_point(path: Sequence[dict[str, float]], multi_label: bool = False) -> dict[str, float]:
    """Highest CV accuracy; ties go to the lower CV loss (the smoother score). Multi-label:
    the lowest CV loss (exact-match accuracy is too coarse to rank C with)."""
    if multi_label:
        return min(path, key=lambda p: p["cv_loss"])
    return max(path, key=lambda p: (round(p["cv_accuracy"], 12), -p["cv_loss"]))


def num_folds(y: torch.Tensor, folds: int) -> int:
    """Folds the smallest class allows (multi-label: its positives), at most `folds`."""
    if objective.is_multi_label(y):
        smallest = int(y.sum(0).min())
    else:
        smallest = int(torch.bincount(y).clamp_min(0)[torch.unique(y)].min())
    return max(0, min(folds, smallest))


def _basis(x: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis of x's row space when it is under half the feature width.

    The L2-regularised optimum's W lies in the span of the training rows (W = -C sum g_i x_i),
    so solving on x @ V (n columns instead of d) is exact and n/d times cheaper.
    """
    n, d = x.shape
    if 2 * n > d:  # the eigh must pay: 1 thread, d=1,280, n=1,232: 0.60 s for a 4% smaller
        return None  # problem (five folds: 3 s of patches' probe); n=640: 0.10 s for half
    # Eigen-decomposition of the n x n Gram matrix: cheaper than an SVD of the n x d matrix.
    evals, evecs = torch.linalg.eigh(x @ x.T)
    keep = evals > evals.max().clamp_min(0) * 1e-12
    return ((x.T @ evecs[:, keep]) / evals[keep].sqrt()).contiguous()


_Fit = tuple[torch.Tensor, torch.Tensor, int]  # (W, b, iterations) of one fold at one C


def _walk_path(solve: Callable[[int, int], _Fit], take: Callable[[int, list[_Fit]], bool],
               k: int, points: int, workers: int) -> ThreadPoolExecutor | None:
    """Solve k folds at path points 0, 1, ... (`solve(fold, point)`); `take(point, fits)` scores
    a point once its k fits are in and returns True to stop the path.

    With threads, a fold starts its next point as soon as its own last one is done (at most one
    point ahead of the point being scored), so no thread idles at each point while the last fold
    of a round finishes: 5 folds on 2 threads take 2.5 fold-solves of time a point, not 3. Each
    fold solves the same sequence either way, so the path is bitwise the same. Returns the pool,
    still finishing the solves begun past the path's end, for the caller to join after its final
    fit (which runs beside them); None without threads.
    """
    if workers <= 1 or points == 0:
        for i in range(points):
            if take(i, [solve(f, i) for f in range(k)]):
                break
        return None
    pool = ThreadPoolExecutor(min(workers, k))
    running: dict[Future[_Fit], tuple[int, int]] = {}
    done: dict[int, dict[int, _Fit]] = {}
    nxt, scored = [0] * k, 0  # each fold's next point; the point being scored
    try:
        while True:
            busy = {f for f, _ in running.values()}
            for f in range(k):
                if f not in busy and nxt[f] < points and nxt[f] <= scored + 1:
                    running[pool.submit(solve, f, nxt[f])] = (f, nxt[f])
                    nxt[f] += 1
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                f, i = running.pop(future)
                done.setdefault(i, {})[f] = future.result()
            while len(done.get(scored, ())) == k:
                fits = done.pop(scored)
                stop = take(scored, [fits[f] for f in range(k)])
                scored += 1
                if stop or scored == points:
                    for future in running:
                        future.cancel()
                    return pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise


def cv_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
              Cs: Sequence[float] = DEFAULT_CS, folds: int = 5, seed: int = 0,
              label_smoothing: float = 0.0,
              class_weight: torch.Tensor | None = None, workers: int = 1) -> HeadFit:
    """Multinomial logistic regression with C chosen by stratified k-fold CV on (x, y) only.

    Folds are solved in float32 to a gradient of `FOLD_TOL` (enough to rank C), the final fit
    in float64 to `FINAL_TOL`. Returns the fit on all of (x, y) at the chosen C,
    standardisation folded in (`state` = {'weight', 'bias'} for raw features).

    `workers`: folds solved at once, in threads, each fold running ahead to its next C without
    waiting for the others (`_walk_path`). Each fold's ops are the same either way, so the
    result is bitwise the same; it pays where torch runs one intra-op thread (`tlreg rank` sets
    one), and on large problems only (small ops hold the GIL:
    tlreg.analysis.rank.PARALLEL_FOLD_WORK), not beside a multi-threaded op.
    """
    import time

    t0 = time.perf_counter()
    x64, y = x.detach().to(torch.float64), y.detach().long()
    multi = objective.is_multi_label(y)
    k = num_folds(y, folds)
    path: list[dict[str, float]] = []
    iterations = 0
    if k >= 2:
        fold_of = stratified_folds(y, k, seed).to(x.device)
        parts = []
        for f in range(k):
            tr, te = fold_of != f, fold_of == f
            mean, std = moments(x64[tr])  # the fold's own statistics: nothing from its test
            xtr, xte = (x64[tr] - mean) / std, (x64[te] - mean) / std
            basis = _basis(xtr)
            if basis is not None:
                xtr, xte = xtr @ basis, xte @ basis
            parts.append((xtr.float(), y[tr], xte.float(), y[te]))
        inits: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * k
        per_fold: dict[float, tuple[float, ...]] = {}
        best_acc, best_loss, since_best = -1.0, math.inf, 0

        def solve(f: int, i: int) -> _Fit:
            w, b, it = fit_logistic(parts[f][0], parts[f][1], num_classes, Cs[i], init=inits[f],
                                    tol=FOLD_TOL, class_weight=class_weight, max_iter=500,
                                    label_smoothing=label_smoothing)
            inits[f] = (w, b)  # strong to weak: the fold's next C starts from here
            return w, b, it

        def take(i: int, fits: list[_Fit]) -> bool:
            """Score path point i from its folds' fits; True: stop the path."""
            nonlocal iterations, best_acc, best_loss, since_best
            correct = loss = 0.0
            accs = []
            for (w, b, it), (_, _, xte, yte) in zip(fits, parts, strict=True):
                iterations += it
                c, s = fold_scores(xte @ w.T + b, yte)
                correct, loss = correct + c, loss + s
                accs.append(c / len(yte))
            per_fold[Cs[i]] = tuple(accs)
            point = {"C": Cs[i], "cv_accuracy": correct / len(y), "cv_loss": loss / len(y)}
            path.append(point)
            better = (point["cv_accuracy"] > best_acc + 1e-12
                      or point["cv_loss"] < best_loss - 1e-9)
            best_acc = max(best_acc, point["cv_accuracy"])
            best_loss = min(best_loss, point["cv_loss"])
            since_best = 0 if better else since_best + 1
            return since_best >= _PATIENCE  # neither score improves: weaker C only over-fits

        pool = _walk_path(solve, take, k, len(Cs), workers)
        chosen = choose_point(path, multi)
        C, reason = chosen["C"], (
            f"C={chosen['C']:.3g}: best {k}-fold CV "
            + (f"loss {chosen['cv_loss']:.4f}" if multi else
               f"accuracy {chosen['cv_accuracy']:.4f}") + f" of {len(path)} on the path")
    else:
        C, chosen, k = 1.0, {"cv_accuracy": None, "cv_loss": None}, 0
        reason = "C=1 (scikit-learn's default): a class has fewer than 2 training images, no CV"
        per_fold, pool = {}, None
    mean, std = moments(x64)
    xs = (x64 - mean) / std
    basis = _basis(xs)
    z = xs @ basis if basis is not None else xs
    try:
        w, b, it = fit_logistic(z, y, num_classes, C, init=None, tol=FINAL_TOL,
                                class_weight=class_weight, history=FINAL_HISTORY,
                                label_smoothing=label_smoothing)
    finally:
        if pool is not None:
            pool.shutdown()  # the solves begun past the path's end ran beside the final fit
    iterations += it
    if basis is not None:
        w = w @ basis.T
    weight, bias = w / std, b - (w / std) @ mean  # folded: the head takes raw features
    return HeadFit(method="lbfgs-cv", folds=k, cv_accuracy=chosen["cv_accuracy"],
                   cv_loss=chosen["cv_loss"], iterations=iterations, C=C, standardised=True,
                   path=tuple(path), reason=reason, seconds=time.perf_counter() - t0,
                   state={"weight": weight.to(x.dtype), "bias": bias.to(x.dtype)},
                   fold_accuracies=per_fold.get(C, ()))
