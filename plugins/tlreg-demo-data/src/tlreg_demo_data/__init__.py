"""The demo images as a tlreg data source: `demo:hymenoptera` is a class folder in this package.

Registered in the `tlreg.datasets` entry-point group, so `tlreg demo` and
`tlreg train demo:hymenoptera ...` work from an installed wheel, with no repository around.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

#: name -> folder of `<split>/<class>/` images shipped in this package.
DATASETS = {"hymenoptera": Path(__file__).resolve().parent / "hymenoptera"}


def demo(location: str, val_split: float | None = None, seed: int = 0):
    """`demo:NAME`: the packaged folder NAME, read by tlreg's own `folder` source."""
    from tlreg.data.folder import folder
    from tlreg.errors import UsageError

    if location not in DATASETS:
        raise UsageError(f"unknown demo data set {location!r}; this package has: "
                         f"{', '.join(f'demo:{n}' for n in DATASETS)}")
    return folder(DATASETS[location], val_split, seed)
