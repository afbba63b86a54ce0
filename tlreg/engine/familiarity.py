"""How familiar an image looks to a model: its nearest training images in feature space.

A softmax must share its probability among the classes it knows, so an image of none of them
(a photo of a rocket shown to an ants / bees model) still gets a confident answer: on
hymenoptera with efficientnet_lite0, keeping 90% of val by the top probability rejected only 8
of 26 of scikit-image's photos, calibrated or not (T never reorders the top probabilities of two
classes). The pretrained features tell them apart at once: the cosine similarity of an image to
its k-th nearest training image (Sun et al. 2022, "Out-of-Distribution Detection with Deep
Nearest Neighbors") put every one of the 26 photos below the 10th percentile of val.

Turned into a p-value against the validation images (conformal prediction: val is scored
against the training bank exactly as a new image is), `familiarity` is the share of val images
that look less familiar than the image. Rejecting below Q then turns away about a share Q of
new in-distribution images, whatever the data set, with no threshold to tune: the guarantee
holds as long as new images come from the distribution val came from.

Pure functions on tensors (torch imported inside); the trainer builds the bank from the cached
features of a frozen backbone, and `predict` scores new images against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

#: The k of the k-th nearest neighbour (Sun et al. use k = 50 on ImageNet's 1.28M images and
#: k = 1 to 10 on CIFAR's 50k; smaller banks need a small k, and k = 5 rejected the same 26 of
#: 26 photos as k = 1 and 10 on hymenoptera's 245 training images).
K = 5
#: At most this many training images in the bank (a seeded, class-stratified subsample):
#: 4,096 x 1,280 float16 features are 10 MB beside the head.
MAX_BANK = 4096


def normalise(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(x.detach().float(), dim=1)


def kth_similarity(x: torch.Tensor, bank: torch.Tensor, k: int = K,
                   chunk: int = 1024) -> torch.Tensor:
    """(N,) cosine similarity of each row of `x` to its k-th most similar row of `bank` (L2-
    normalised rows), in chunks so N x bank never sits in memory at once."""
    import torch

    if bank.dim() != 2 or x.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise UsageError(f"features of width {x.shape[-1]} against a bank of shape "
                         f"{tuple(bank.shape)}: they come from different backbones")
    k = max(1, min(k, len(bank)))
    b = bank.float()
    out = [(normalise(x[i:i + chunk]) @ b.T).topk(k, dim=1).values[:, -1]
           for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def subsample(labels: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """Indices of at most `cap` rows, every class keeping its share (seeded; all if fewer)."""
    import torch

    n = len(labels)
    if n <= cap:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    keys = labels if labels.dim() == 1 else labels.argmax(1)
    picked = []
    for c in keys.unique():
        rows = (keys == c).nonzero().flatten()
        take = max(1, round(cap * len(rows) / n))
        picked.append(rows[torch.randperm(len(rows), generator=g)[:take]])
    return torch.cat(picked).sort().values[:cap]


def build(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, *, k: int = K,
          cap: int = MAX_BANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors a run stores: the bank (normalised training features, float16), the sorted
    val scores the p-values are taken against, and k."""
    import torch

    if len(x_val) < 2 or len(x_train) < 1:
        raise UsageError("familiarity needs training images and at least 2 validation images")
    bank = normalise(x_train[subsample(y_train, cap, seed)]).half()
    scores = kth_similarity(x_val, bank, k).sort().values
    return {"bank": bank.contiguous(), "val_scores": scores.float().contiguous(),
            "k": torch.tensor([k], dtype=torch.int64)}


def familiarity(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) conformal p-values in (0, 1]: (1 + #val scores <= the image's) / (1 + #val)."""
    import torch

    s = kth_similarity(x, tensors["bank"], int(tensors["k"].item()))
    val = tensors["val_scores"].float()
    below = torch.searchsorted(val, s.contiguous(), right=True)
    return (1 + below).float() / (1 + len(val))


def check(tensors: dict[str, torch.Tensor], width: int, where: str,
          error: type[Exception] = UsageError) -> dict[str, torch.Tensor]:
    """A stored bank, or `error` naming `where` when it is damaged or of another width (an
    artifact's reader and writer raise ArtifactError)."""
    bank, val, k = tensors.get("bank"), tensors.get("val_scores"), tensors.get("k")
    if (bank is None or val is None or k is None or bank.dim() != 2 or val.dim() != 1
            or k.numel() != 1 or len(val) < 2 or int(k.item()) < 1):
        raise error(f"{where} is not a familiarity bank (bank, val_scores, k)")
    if bank.shape[1] != width:
        raise error(f"{where} holds features of width {bank.shape[1]}, the model's "
                    f"are {width}")
    return tensors
