"""Artifact size: a linear-head feature-extract artifact on resnet18 vs the full model file.

Random weights give the same sizes as pretrained ones, so this runs offline: the random
backbone stands in for the pretrained one (its state is passed as the pretrained state, so the
artifact stores no backbone tensors, exactly as for a feature-extract run on real weights).

    python -m bench.artifact_size    # prints the sizes and rewrites docs/benchmarks.md
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "artifact-size"
BEGIN, END = f"<!-- bench:{SECTION} -->", f"<!-- /bench:{SECTION} -->"


def measure(workdir: Path, backbone: str = "resnet18", num_classes: int = 2) -> dict[str, Any]:
    """Sizes in bytes of the full model safetensors file and of the artifact's files."""
    import torch
    from safetensors.torch import save_file

    from tlreg.models.transfer import create_model
    from tlreg.sharing.save import save_artifact

    torch.manual_seed(0)
    model = create_model(backbone, num_classes, head="linear", policy="feature-extract",
                         pretrained=False, label_names=[f"class{i}" for i in range(num_classes)])
    model.info = replace(model.info, weights_source="timm")  # as if built on the named weights
    full = workdir / "full_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, full)
    folder = save_artifact(model, workdir / "artifact",
                           pretrained_state=model.backbone.state_dict())
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    artifact = sum(files.values())
    return {
        "backbone": backbone,
        "num_classes": num_classes,
        "full_model_bytes": full.stat().st_size,
        "head_bytes": files["head.safetensors"],
        "artifact_bytes": artifact,
        "artifact_files": files,
        "ratio": artifact / full.stat().st_size,
    }


def render(result: dict[str, Any]) -> str:
    """The section body for docs/benchmarks.md (markers are added by `write_section`)."""
    files = ", ".join(f"`{n}` {s:,} B" for n, s in result["artifact_files"].items())
    return "\n".join([
        f"### Artifact size ({result['backbone']}, linear head, {result['num_classes']} classes, "
        "feature-extract)",
        "",
        "| what | bytes |",
        "| --- | ---: |",
        f"| full model (`model.safetensors`, backbone + head) | {result['full_model_bytes']:,} |",
        f"| `head.safetensors` | {result['head_bytes']:,} |",
        f"| whole artifact folder | {result['artifact_bytes']:,} |",
        "",
        f"The artifact is {100 * result['ratio']:.3f}% of the full model file ({files}). "
        "Measured by `python -m bench.artifact_size` (random weights give the same sizes).",
    ])


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and rewrite the docs section (`quick` changes nothing: it is already fast)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench._report import write_section

    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp))
    write_section(SECTION, render(result))
    return result


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(f"full model {res['full_model_bytes']:,} B, head {res['head_bytes']:,} B, "
          f"artifact {res['artifact_bytes']:,} B ({100 * res['ratio']:.3f}%)")
