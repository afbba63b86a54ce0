"""Release packages: what `pip install tlreg` gives, checked on built files, not on a clone.

`.ci/run` builds every sdist and wheel, installs the wheels non-editably into a fresh virtual
environment and runs this module there with TLREG_DIST_DIR (wheels built from the sdists, as
`python -m build` does) and TLREG_DIRECT_DIR (wheels built straight from the source trees). In
a development checkout both are unset and the module is skipped.
"""

from __future__ import annotations

import os
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

DIST = os.environ.get("TLREG_DIST_DIR")
DIRECT = os.environ.get("TLREG_DIRECT_DIR")
pytestmark = pytest.mark.skipif(not (DIST and DIRECT), reason="runs on built packages in CI")
PACKAGES = ("tlreg", "tlreg_efficientnet_lite", "tlreg_demo_data")


def _wheel(folder: str, name: str) -> Path:
    found = sorted(Path(folder).glob(f"{name}-*.whl"))
    assert len(found) == 1, f"expected one {name} wheel in {folder}, found {found}"
    return found[0]


@pytest.mark.parametrize("name", PACKAGES)
def test_a_wheel_from_the_sdist_has_the_files_of_one_built_directly(name: str) -> None:
    def files(wheel: Path) -> list[str]:
        with zipfile.ZipFile(wheel) as z:
            return sorted(n for n in z.namelist() if not n.endswith("/RECORD"))

    assert files(_wheel(DIST or "", name)) == files(_wheel(DIRECT or "", name))


def test_installed_not_editable_and_the_demo_data_is_inside() -> None:
    import tlreg_demo_data

    import tlreg

    for module in (tlreg, tlreg_demo_data):
        assert "site-packages" in Path(module.__file__).parts, module.__file__
        direct_url = metadata.distribution(module.__name__.replace("_", "-")).read_text(
            "direct_url.json") or ""
        assert '"editable": true' not in direct_url
    images = sorted(tlreg_demo_data.DATASETS["hymenoptera"].rglob("*.jpg"))
    assert len(images) == 397
    with zipfile.ZipFile(_wheel(DIST or "", "tlreg")) as z:
        assert not any(n.endswith(".jpg") for n in z.namelist())  # tlreg's own wheel stays small


def test_versions_are_single_sourced() -> None:
    import tlreg_demo_data
    import tlreg_efficientnet_lite

    import tlreg

    for module in (tlreg, tlreg_demo_data, tlreg_efficientnet_lite):
        assert metadata.version(module.__name__.replace("_", "-")) == module.__version__
    from tlreg.plugins import tlreg_requirement

    assert tlreg_requirement("tlreg-demo-data") == "<0.2,>=0.1"
    assert tlreg_requirement("tlreg-efficientnet-lite") == "<0.2,>=0.1"
