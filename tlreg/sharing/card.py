"""The model card (README.md): Hub metadata for search, and a summary for people.

Built from config.json alone, so a card always says what the artifact holds. It is the one file
not checksummed: cards are meant to be edited on the Hub, and never affect loading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tlreg.engine.objective import MULTI_LABEL
from tlreg.sharing.format import (
    CURVE_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    REPO_ID_PLACEHOLDER,
    WEIGHTS_DELTA,
    WEIGHTS_FULL,
    WEIGHTS_NONE,
)


def model_card(config: Mapping[str, Any], *, has_curve: bool) -> str:
    """README.md: Hub metadata (via huggingface_hub's ModelCardData) and a human summary."""
    from huggingface_hub import ModelCard, ModelCardData

    bb = config["backbone"]
    labels = config["label_names"]
    metrics = config.get("metrics") or {}
    data = ModelCardData(
        library_name="tlreg",
        pipeline_tag="image-classification",
        tags=["tlreg", "image-classification", "timm", "transfer-learning",
              f"head:{config['head']['name']}", f"policy:{config['policy']['name']}"],
        base_model=bb.get("hub_id") if bb["weights_source"] == "timm" else None,
        datasets=[config["dataset"]] if config.get("dataset") else None,
        metrics=sorted({_metric_id(k) for k in metrics}) or None,
    )
    arch = f"{bb['timm_name']}.{bb['tag']}" if bb.get("tag") else bb["timm_name"]
    linked = bb.get("hub_id") and bb["weights_source"] == "timm"
    base = f"[{arch}](https://huggingface.co/{bb['hub_id']})" if linked else f"`{arch}`"
    title = " vs ".join(labels) if len(labels) <= 4 else f"{len(labels)}-class classifier"
    stored = {
        WEIGHTS_NONE: "Only the head is stored here; the backbone is rebuilt from its public "
                      "weights, pinned by their SHA-256.",
        WEIGHTS_DELTA: "The head and the backbone tensors that training changed are stored here; "
                       "the rest is rebuilt from the public weights, pinned by their SHA-256.",
        WEIGHTS_FULL: "The head and the whole backbone are stored here (its weights were not a "
                      "public named source).",
    }[bb["weights"]]
    dc = config["data_config"]
    thresholds = (config.get("thresholds") if config.get("problem_type") == MULTI_LABEL
                  else None)
    if thresholds:
        outputs = ("Multi-label: each label has its own sigmoid probability, and a label "
                   "applies when its probability reaches its threshold (tuned for F1 on the "
                   "validation split); an image can have any number of labels.")
        table = ["| index | label | threshold |", "| --- | --- | --- |",
                 *(f"| {i} | {_cell(name)} | {t:.4f} |"
                   for i, (name, t) in enumerate(zip(labels, thresholds, strict=True)))]
    else:
        outputs = "Single-label: softmax probabilities over the labels, one label per image."
        table = ["| index | label |", "| --- | --- |",
                 *(f"| {i} | {_cell(name)} |" for i, name in enumerate(labels))]
    lines = [
        f"# {title}",
        "",
        f"An image classifier: a `{config['head']['name']}` head on the {base} backbone "
        f"(`{bb['name']}`), trained with [tlreg](https://github.com/tlreg/tlreg) "
        f"(policy `{config['policy']['name']}`). {stored}",
        "",
        "## Labels",
        "",
        outputs,
        "",
        *table,
        "",
    ]
    if metrics:
        lines += ["## Validation metrics", "", "| metric | value |", "| --- | --- |",
                  *(f"| {_cell(k)} | {_fmt(v)} |" for k, v in sorted(metrics.items())), ""]
    if has_curve:
        lines += ["## Training curve", "", f"![training curve]({CURVE_FILE})", ""]
    lines += [
        "## Preprocessing",
        "",
        f"Input size {dc.get('input_size')}, mean {dc.get('mean')}, std {dc.get('std')}, "
        f"{dc.get('interpolation')} interpolation, crop {dc.get('crop_mode')} "
        f"{dc.get('crop_pct')}. `from_pretrained` restores it with the model.",
        "",
        "## Use it",
        "",
        "```python",
        "from tlreg import TransferModel",
        "",
        f'model = TransferModel.from_pretrained("{REPO_ID_PLACEHOLDER}")',
        "print(model.info.label_names, model.data_config)",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        "pip install tlreg",
        f"tlreg predict {REPO_ID_PLACEHOLDER} image.jpg --top-k {min(5, len(labels))}",
        "```",
        "",
        f"Backbone weights SHA-256: `{bb.get('weights_sha256')}`. "
        f"Format: `{FORMAT_NAME}` version {config.get('format_version', FORMAT_VERSION)}.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _metric_id(key: str) -> str:
    name = re.sub(r"^(val|valid|validation|best|eval)[_/-]", "", key.lower())
    return {"acc": "accuracy", "top1": "accuracy", "acc1": "accuracy"}.get(name, name)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
