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
    title = _title(labels)
    stored = {
        WEIGHTS_NONE: "Only the head is stored here; the backbone is rebuilt from its public "
                      "weights, pinned by their SHA-256.",
        WEIGHTS_DELTA: "The head and the backbone tensors that training changed are stored here; "
                       "the rest is rebuilt from the public weights, pinned by their SHA-256.",
        WEIGHTS_FULL: "The head and the whole backbone are stored here (its weights were not a "
                      "public named source).",
    }[bb["weights"]]
    dc = config["data_config"]
    outputs, table = _labels(labels, config.get("problem_type"), config.get("thresholds"))
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
    lines += _metrics(metrics)
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


def deploy_card(kind: str, *, labels: list[str], architecture: str, backbone: str, head: str,
                base_model: str | None, problem_type: str | None = None,
                thresholds: list[float] | None = None,
                metrics: Mapping[str, Any] | None = None, dataset: str | None = None) -> str:
    """README.md of a `timm` or `onnx` export: the metadata the Hub's widget and search read.

    `kind` names the library that loads the folder (`library_name`), so the Hub offers its
    snippet; the body says how to use it without tlreg.
    """
    from huggingface_hub import ModelCard, ModelCardData

    metrics = dict(metrics or {})
    data = ModelCardData(
        library_name=kind, pipeline_tag="image-classification",
        tags=sorted({kind, "image-classification", "timm", "tlreg", "transfer-learning",
                     f"head:{head}"}),
        base_model=base_model, datasets=[dataset] if dataset else None,
        metrics=sorted({_metric_id(k) for k in metrics}) or None)
    outputs, table = _labels(labels, problem_type, thresholds)
    what = {"timm": "saved as a plain timm model: timm and transformers load it without tlreg.",
            "onnx": "exported to ONNX with its preprocessing (preprocess.json, and the same "
                    "fields in the model's metadata): onnxruntime runs it without PyTorch."}[kind]
    base = f"[{architecture}](https://huggingface.co/{base_model})" if base_model else (
        f"`{architecture}`")
    lines = [f"# {_title(labels)}", "",
             f"An image classifier: a `{head}` head on the {base} backbone (`{backbone}`), "
             f"trained with [tlreg](https://github.com/tlreg/tlreg), {what}", "",
             "## Labels", "", outputs, "", *table, "", *_metrics(metrics),
             "## Use it", "", *_USAGE[kind], ""]
    text = "\n".join(lines).replace("{repo}", REPO_ID_PLACEHOLDER)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


def base_model(info: Any) -> str | None:
    """The Hub repo of the pretrained weights a model started from (the card's `base_model`)."""
    if info.weights_source != "timm" or not info.hub_id:
        return None
    return str(info.hub_id).partition("@")[0]


_USAGE = {
    "timm": ["```python", "import timm, torch", "from PIL import Image", "",
             'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
             "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, "
             "model=model))",
             "with torch.no_grad():",
             '    probs = model(transform(Image.open("image.jpg").convert("RGB"))[None])'
             ".softmax(-1)",
             "print(dict(zip(model.pretrained_cfg[\"label_names\"], probs[0].tolist())))",
             "```", "", "or with transformers (its timm wrapper):", "", "```python",
             "from transformers import pipeline", "",
             'classifier = pipeline("image-classification", model="{repo}")',
             'print(classifier("image.jpg"))', "```"],
    "onnx": ["```bash", "pip install 'tlreg[onnx]'   # onnxruntime, NumPy and Pillow; no torch",
             "hf download {repo} --local-dir model", "tlreg predict model/model.onnx image.jpg",
             "```", "",
             "Any ONNX runtime works: the input `pixel_values` is a float32 NCHW batch, "
             "preprocessed as preprocess.json says (resize, crop, mean, std); the output is "
             "`logits`."],
}


def _title(labels: list[str]) -> str:
    return " vs ".join(labels) if len(labels) <= 4 else f"{len(labels)}-class classifier"


def _labels(labels: list[str], problem_type: str | None,
            thresholds: list[float] | None) -> tuple[str, list[str]]:
    """What the outputs mean, and the label table (with thresholds for a multi-label model)."""
    if problem_type == MULTI_LABEL and thresholds:
        outputs = ("Multi-label: each label has its own sigmoid probability, and a label "
                   "applies when its probability reaches its threshold (tuned for F1 on the "
                   "validation split); an image can have any number of labels.")
        return outputs, ["| index | label | threshold |", "| --- | --- | --- |",
                         *(f"| {i} | {_cell(name)} | {t:.4f} |"
                           for i, (name, t) in enumerate(zip(labels, thresholds, strict=True)))]
    outputs = "Single-label: softmax probabilities over the labels, one label per image."
    return outputs, ["| index | label |", "| --- | --- |",
                     *(f"| {i} | {_cell(name)} |" for i, name in enumerate(labels))]


def _metrics(metrics: Mapping[str, Any]) -> list[str]:
    if not metrics:
        return []
    return ["## Validation metrics", "", "| metric | value |", "| --- | --- |",
            *(f"| {_cell(k)} | {_fmt(v)} |" for k, v in sorted(metrics.items())), ""]


def _metric_id(key: str) -> str:
    name = re.sub(r"^(val|valid|validation|best|eval)[_/-]", "", key.lower())
    return {"acc": "accuracy", "top1": "accuracy", "acc1": "accuracy"}.get(name, name)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
