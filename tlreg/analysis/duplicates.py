"""Near-duplicates, leaks and outliers from a feature matrix (pure functions on tensors).

**Copies** are compared by the cosine similarity of *centred* features: the data set's mean
feature is subtracted before each row is L2-normalised (`normalise`). Pooled CNN features are
all positive and share a large common component, so two unrelated photos already sit at raw
cosine 0.6-0.8; centring removes what every image of the data set has in common, which more
than doubles the gap between the closest distinct photos and re-encoded copies (the numbers are
above `DUPLICATE_THRESHOLD`). The mean needs a few dozen images to mean anything: on a handful
of images centring exaggerates their differences (two images centre to opposite vectors).

**Outliers** are the opposite question, how much of what the data set's images share an image
lacks, so they are measured on raw L2-normalised features (`normalise(x, centre=False)`), as
cleanlab's `OutOfDistribution` does (mean cosine distance to the k nearest neighbours).

Every search here is blocked (`block` query rows at a time against all keys), so memory stays
at `block x n` similarities; the time is quadratic in the number of images (one n x d by d x n
product: seconds for 10,000 images on two cores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import Sample

# Measured with the real pretrained EfficientNet-Lite0 (tlreg-efficientnet-lite), centred cosine
# (docs/audit.md has the tables and how they were measured):
# - re-encoded, resized copies of photos: hymenoptera's 397 photos against their copies in
#   tlreg-demo-data (shorter side 256 px, Lanczos, JPEG quality 85): lowest 0.773, 1st percentile
#   0.806, median 0.918; 15 val photos at 80% size, JPEG quality 75 (the slow test): 0.773-0.983;
#   20 photos as JPEG q85 same size: lowest 0.963, q90 at 1.3x: 0.976, 10% cropped: 0.742;
# - the nearest *distinct* photo: hymenoptera (398 photos; the closest pairs are two shots of one
#   scene) median 0.467, 99th percentile 0.679, highest 0.695 (raw cosine: 0.806 against copies
#   from 0.838, a gap of 0.03 where centring leaves 0.08).
# 0.73 sits midway between the closest distinct photos and the farthest copies. It does not
# hold for small images (under ~100 px), where re-encoding moves features more than distinct
# images differ: 64-112 px crops of 10 photos (patches), distinct 0.999 (overlapping crops),
# copies at JPEG q85 down to 0.63; 25 px faces 0.990 and 0.47; 8 px digits 0.968 and 0.73.
# There, only the byte-identical check is exact.
#: Centred cosine similarity at or above which two images are reported as near-duplicates.
DUPLICATE_THRESHOLD = 0.73
#: Neighbours averaged for an image's typicality (cleanlab's OutOfDistribution uses 10).
NEIGHBOURS = 5
#: Modified z-score (Iglewicz and Hoaglin 1993: 0.6745 (median - s) / MAD) above which an image's
#: typicality is reported as an outlier: their recommended cut-off for outlying values.
OUTLIER_Z = 3.5


def normalise(x: torch.Tensor, mean: torch.Tensor | None = None, *,
              centre: bool = True) -> torch.Tensor:
    """Rows of `x` centred (on `mean`, default x's own; `centre=False`: not) and scaled to unit
    L2 norm, in float32."""
    x = x.detach().float()
    if centre:
        x = x - (x.mean(0) if mean is None else mean.float())
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int = 1, *, same: bool = False,
            earlier: bool = False, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each `len(queries) x k`: every query row's `k` most similar key
    rows by dot product (cosine for `normalise`d rows), most similar first.

    `same`: queries are the keys, and a row is never its own neighbour. `earlier` (with `same`):
    only keys before the query count (row i looks at rows 0..i-1), so a pair is found once, from
    its later row. Where fewer than `k` keys qualify the rest is similarity -inf, index -1.
    """
    import torch

    n, m = len(queries), len(keys)
    k_eff = min(k, m)
    sims = torch.full((n, k), -torch.inf)
    idx = torch.full((n, k), -1, dtype=torch.long)
    if n == 0 or m == 0 or k_eff == 0:
        return sims, idx
    cols = torch.arange(m)
    for start in range(0, n, block):
        s = queries[start:start + block] @ keys.T
        if same:
            rows = torch.arange(start, start + len(s))[:, None]
            s.masked_fill_(cols[None, :] >= rows if earlier else cols[None, :] == rows,
                           -torch.inf)
        top = s.topk(k_eff, dim=1)
        sims[start:start + len(s), :k_eff] = top.values
        idx[start:start + len(s), :k_eff] = torch.where(top.values.isfinite(), top.indices, -1)
    return sims, idx


@dataclass(frozen=True)
class Match:
    """Row `index` is a near-copy of row `other` (of the same matrix, or of another)."""

    index: int
    other: int
    similarity: float


def duplicates_within(x: torch.Tensor, threshold: float, *, block: int = 1024) -> list[Match]:
    """Each row whose most similar *earlier* row reaches `threshold`: a group of copies is
    reported from its second member on, each pointing at the closest member before it."""
    sims, idx = nearest(x, x, 1, same=True, earlier=True, block=block)
    return [Match(i, int(idx[i, 0]), min(1.0, float(sims[i, 0])))
            for i in range(len(x)) if sims[i, 0] >= threshold]


def duplicates_across(x: torch.Tensor, others: torch.Tensor, threshold: float, *,
                      block: int = 1024) -> list[Match]:
    """Each row of `x` whose most similar row of `others` reaches `threshold` (a training image
    that is also in validation: a leak)."""
    sims, idx = nearest(x, others, 1, block=block)
    return [Match(i, int(idx[i, 0]), min(1.0, float(sims[i, 0])))
            for i in range(len(x)) if sims[i, 0] >= threshold]


def typicality(x: torch.Tensor, k: int = NEIGHBOURS, *, block: int = 1024) -> torch.Tensor:
    """Each row's mean similarity to its `k` nearest other rows: low means unlike anything else
    in the data set."""
    import torch

    sims, _ = nearest(x, x, k, same=True, block=block)
    finite = sims.isfinite()
    return torch.where(finite, sims, 0.0).sum(1) / finite.sum(1).clamp_min(1)


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """How far each value sits *below* the median, in modified z-scores (0.6745 (median - v) /
    MAD; Iglewicz and Hoaglin 1993); MAD 0 (half the values equal): only unequal ones score."""
    import torch

    median = values.median()
    mad = (values - median).abs().median()
    if float(mad) <= 0:
        return torch.where(values < median, torch.inf, 0.0)
    return 0.6745 * (median - values) / mad


def outliers(x: torch.Tensor, z: float = OUTLIER_Z, k: int = NEIGHBOURS, *, block: int = 1024,
             ) -> list[tuple[int, float, float, float]]:
    """(row, typicality, its z-score, the median typicality) of each row more than `z` robust
    standard deviations less typical than the median image, least typical first.

    `x`: raw L2-normalised features (`normalise(x, centre=False)`). Measured on hymenoptera with
    EfficientNet-Lite0: median typicality 0.63 (MAD 0.048); the 9 rows past z 3.5 are the
    "image not found" placeholder GIF (z 6.5), an ant-bait box, a larva, specks of ants on a
    wall, comb and pollen: no ant or bee in view. Centred features miss the placeholder (z 2.1):
    what it lacks is what every photo shares.
    """
    if len(x) <= k:  # too few images to say what is typical
        return []
    typ = typicality(x, k, block=block)
    scores = robust_z(typ)
    median = float(typ.median())
    rows = [(i, float(typ[i]), float(scores[i]), median) for i in range(len(x))
            if float(scores[i]) > z]
    return sorted(rows, key=lambda r: -r[2])


def identical_files(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(i, j), j < i: sample i has the same bytes as the earlier sample j.

    Files are hashed only when another file has the same size (what a real data set almost never
    has twice), so the check reads little beyond the copies themselves.
    """
    import os

    sizes: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        try:
            size = len(s.data) if s.data is not None else os.stat(s.path).st_size
        except OSError:
            continue
        sizes.setdefault(size, []).append(i)
    first: dict[str, int] = {}
    out = []
    for group in sizes.values():
        if len(group) < 2:
            continue
        for i in group:
            digest = _digest(samples[i])
            if digest is None:
                continue
            if digest in first:
                out.append((i, first[digest]))
            else:
                first[digest] = i
    return sorted(out)


def _digest(sample: Sample) -> str | None:
    if sample.data is not None:
        return sample.key or hashlib.sha256(sample.data).hexdigest()
    h = hashlib.sha256()
    try:
        with open(sample.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()
