"""Honest evaluation: run a model over a split and report OA, kappa, per-class scores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from casd_core.atomic import write_text_atomic
from casd_core.data import SceneDataset, build_transforms, read_split
from casd_core.errors import CasdError
from casd_core.metrics import (classification_report, confusion_matrix, most_confused_pairs,
                               plot_confusion_matrix, save_confusion_csv)
from casd_core.package import ModelPackage
from casd_core.progress import Monitor
from casd_core.runtime import prepare_cpu, resolve_device

REPORT_NAME = "metrics.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"


@torch.inference_mode()
def predict_dataset(model: torch.nn.Module, dataset: SceneDataset, device: torch.device,
                    batch_size: int = 64, monitor: Monitor | None = None,
                    workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted class indices for every image of ``dataset`` (``workers`` loader
    processes; by default 8 on CUDA, 1 on CPU where the model needs the cores)."""
    monitor = monitor or Monitor()
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else 1
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=cuda)
    truth, predicted = [], []
    for step, (images, labels) in enumerate(loader):
        monitor.check_cancelled()
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            logits = model(images)
        truth.append(labels.numpy())
        predicted.append(logits.argmax(1).cpu().numpy())
        monitor.report("batches", step + 1, len(loader), item="evaluating")
    model.train(was_training)
    if not truth:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(truth), np.concatenate(predicted)


def evaluate_model(model: torch.nn.Module, dataset: SceneDataset, device: torch.device,
                   batch_size: int = 64, with_confusion: bool = False,
                   monitor: Monitor | None = None, workers: int | None = None) -> dict[str, Any]:
    """The classification report of ``model`` on ``dataset`` (plus the matrix if asked)."""
    truth, predicted = predict_dataset(model, dataset, device, batch_size, monitor, workers)
    confusion = confusion_matrix(truth, predicted, len(dataset.class_names))
    report = classification_report(confusion, dataset.class_names)
    if with_confusion:
        report["confusion"] = confusion
    return report


def write_report(report: dict[str, Any], class_names: list[str], out_dir: Path) -> dict[str, Path]:
    """Write the metrics JSON, the confusion matrix CSV and its PNG plot into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = report["confusion"]
    paths = {"metrics": out_dir / REPORT_NAME, "confusion_csv": out_dir / CONFUSION_CSV,
             "confusion_png": out_dir / CONFUSION_PNG}
    serialisable = {k: v for k, v in report.items() if k != "confusion"}
    serialisable["most_confused"] = most_confused_pairs(confusion, class_names)
    write_text_atomic(json.dumps(serialisable, indent=2), paths["metrics"])
    save_confusion_csv(confusion, class_names, paths["confusion_csv"])
    plot_confusion_matrix(confusion, class_names, paths["confusion_png"],
                          title=f"OA {report['overall_accuracy']:.2%}, kappa {report['kappa']:.3f}")
    return paths


def evaluate_package(package_path: str | os.PathLike, data_root: str | os.PathLike,
                     split_csv: str | os.PathLike, split: str = "test", out_dir: str | os.PathLike | None = None,
                     batch_size: int = 64, device: str = "auto", monitor: Monitor | None = None) -> dict[str, Any]:
    """Evaluate a model package on one split of a split CSV (by default its ``test`` rows).

    Images are prepared exactly as during training's evaluation (resize to the package's
    input size, its normalisation), so the test accuracy recorded at training is reproduced.
    """
    package = ModelPackage.load(package_path)
    splits, class_names = read_split(Path(split_csv), Path(data_root))
    if split not in splits:
        raise CasdError(f"{split_csv} has no rows with split={split!r} (it has: {', '.join(sorted(splits))})")
    unknown = sorted(set(class_names) - set(package.class_names))
    if unknown:
        raise CasdError(f"the model does not know the classes {', '.join(unknown)} found in {split_csv}")
    # The CSV's class indices follow its own sorted names; map them onto the package's order.
    to_package = {i: package.class_names.index(name) for i, name in enumerate(class_names)}
    samples = [type(s)(s.path, to_package[s.label]) for s in splits[split]]
    transform = build_transforms(package.input_size, package.mean, package.std, train=False)
    bands = package.training.get("bands")  # band indices the model was trained on (multi-band chips)
    dataset = SceneDataset(samples, package.class_names, transform, bands=bands, value_scale=package.value_scale)
    torch_device = resolve_device(device)
    prepare_cpu()
    model = package.build_model().to(torch_device)
    if torch_device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    report = evaluate_model(model, dataset, torch_device, batch_size, with_confusion=True, monitor=monitor)
    report = {"model": str(package_path), "split": split, "split_csv": str(split_csv), **report}
    if out_dir is not None:
        report["files"] = {k: str(v) for k, v in write_report(report, package.class_names, Path(out_dir)).items()}
    report.pop("confusion")
    return report
