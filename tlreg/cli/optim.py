"""CLI commands over the optimizer builder: `lr-plan`."""

from __future__ import annotations

import typer

from tlreg.cli._output import print_json, print_table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tlreg` app."""
    app.command("lr-plan")(lr_plan)


def lr_plan(
    backbone: str = typer.Argument(..., help="Backbone name (or timm:<name>)."),
    lr: float | None = typer.Option(None, "--lr", help="Head learning rate [backbone default]."),
    layer_decay: float | None = typer.Option(
        None, "--layer-decay", help="Rate factor per layer below the head [backbone default]."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="For weights, not norms."),
    backbone_lr_mult: float = typer.Option(1.0, "--backbone-lr-mult",
                                           help="Extra factor for every backbone layer."),
    min_lr: float = typer.Option(0.0, "--min-lr", help="Floor for every backbone layer's rate."),
    head: str | None = typer.Option(None, "--head", help="Head name [backbone default]."),
    num_classes: int = typer.Option(2, "--num-classes", help="Classes of the head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Per-layer learning rates and weight decay, as training would use them.

    Builds the model with random weights: nothing is downloaded.
    """
    from tlreg.engine.optim import lr_plan as plan
    from tlreg.models.backbones import get_backbone
    from tlreg.models.transfer import create_model

    spec = get_backbone(backbone)
    lr = spec.lr if lr is None else lr
    layer_decay = spec.layer_decay if layer_decay is None else layer_decay
    model = create_model(backbone, num_classes, head=head, pretrained=False)
    rows = plan(model, lr=lr, layer_decay=layer_decay, weight_decay=weight_decay,
                backbone_lr_mult=backbone_lr_mult, min_lr=min_lr)
    if as_json:
        print_json({
            "backbone": backbone, "timm_name": model.info.timm_name, "head": model.info.head,
            "lr": lr, "layer_decay": layer_decay, "weight_decay": weight_decay,
            "backbone_lr_mult": backbone_lr_mult, "min_lr": min_lr,
            "num_layers": model.num_layers, "num_stages": model.num_stages, "layers": rows,
        })
        return
    title = (f"{backbone}: {model.num_layers} layers + head, lr {lr:g}, layer decay "
             f"{layer_decay:g}, weight decay {weight_decay:g}"
             + (f", backbone x{backbone_lr_mult:g}" if backbone_lr_mult != 1 else "")
             + (f", floor {min_lr:g}" if min_lr else ""))
    print_table(
        ["layer", "stage", "modules", "params", "no-wd params", "lr", "x head", "wd"],
        [(r["layer"], r["stage"], _modules(r["modules"]), f"{r['params']:,}",
          f"{r['no_decay_params']:,}", f"{r['lr']:.4g}", f"{r['lr_mult']:.4g}",
          f"{r['weight_decay']:g}") for r in rows],
        title=title,
    )


def _modules(names: list[str], limit: int = 3) -> str:
    more = f" +{len(names) - limit}" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
