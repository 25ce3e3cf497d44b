"""Honest evaluation: run a model over a split and report OA, kappa, per-class scores and how
well its scores are calibrated (ECE, with and without the package's temperature), optionally
with test-time augmentation. A ``.safetensors`` package runs in torch, an ``.onnx`` export in
onnxruntime; both see the very same batches (decoded and resized by torchvision, as in
training), so their reports compare row for row.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from casd_core.atomic import write_text_atomic
from casd_core.calibration import expected_calibration_error, reliability_table
from casd_core.data import Sample, SceneDataset, build_transforms, read_split
from casd_core.errors import CasdError
from casd_core.metrics import (classification_report, confusion_matrix, most_confused_pairs,
                               plot_confusion_matrix, save_confusion_csv)
from casd_core.package import ModelPackage
from casd_core.progress import Monitor
from casd_core.runtime import prefers_channels_last, prepare_cpu, resolve_device
from casd_core.tta import VIEWS, averaged_probabilities

REPORT_NAME = "metrics.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"


@dataclass
class Predictions:
    """What a model says about every image of a dataset (numpy arrays, dataset order).

    ``probabilities`` is softmax(logits / T), averaged over the 8 dihedral views with TTA;
    ``uncalibrated`` the same with T = 1; ``logits`` the single-view logits (``None`` with
    TTA). ``predicted`` is the argmax of the logits, or of ``probabilities`` with TTA (where
    averaging makes the label depend, slightly, on T).
    """

    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    uncalibrated: np.ndarray
    logits: np.ndarray | None
    images_per_s: float


@torch.inference_mode()
def predict_outputs(model: torch.nn.Module, dataset: SceneDataset, device: torch.device,
                    batch_size: int = 64, monitor: Monitor | None = None, workers: int | None = None,
                    temperature: float = 1.0, tta: bool = False) -> Predictions:
    """Run ``model`` over ``dataset`` (``workers`` loader processes; by default 8 on CUDA, 1 on
    CPU where the model needs the cores). ``batch_size`` is images per forward pass: with
    ``tta`` a batch holds ``batch_size // 8`` images, each in its 8 views
    (:func:`casd_core.tta.averaged_probabilities`)."""
    monitor = monitor or Monitor()
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else 1
    per_batch = max(1, batch_size // VIEWS) if tta else batch_size
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=workers, pin_memory=cuda)
    # Results go into arrays allocated once: small tensors kept from every batch would sit
    # between the batches' large freed blocks and, with the CPU malloc tuning (no trimming),
    # make the heap grow batch after batch (tens of GB over a TTA run of AID's test rows).
    n, num_classes = len(dataset), len(dataset.class_names)
    labels = np.zeros(n, dtype=np.int64)
    probabilities, uncalibrated = np.zeros((2, n, num_classes), dtype=np.float32)
    logits = None if tta else np.zeros((n, num_classes), dtype=np.float32)
    start = 0
    started = time.perf_counter()
    for step, (images, truth) in enumerate(loader):
        monitor.check_cancelled()
        end = start + len(truth)
        images = images.to(device, non_blocking=True)
        if prefers_channels_last(device) and not isinstance(model, OnnxLogits):  # onnxruntime takes NCHW
            images = images.contiguous(memory_format=torch.channels_last)
        seen: list[torch.Tensor] = []

        def logits_of(batch: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                seen.append(model(batch).float())
            return seen[-1]

        probabilities[start:end] = averaged_probabilities(logits_of, images, temperature, tta).cpu().numpy()
        # the same views' logits at T = 1, without a second forward pass
        uncalibrated[start:end] = averaged_probabilities(lambda _: seen[0], images, 1.0, tta).cpu().numpy()
        if logits is not None:
            logits[start:end] = seen[0].cpu().numpy()
        labels[start:end] = truth.numpy()
        start = end
        monitor.report("batches", step + 1, len(loader), item="evaluating")
    elapsed = time.perf_counter() - started
    model.train(was_training)
    return Predictions(
        labels=labels, predicted=(logits if logits is not None else probabilities).argmax(1).astype(np.int64),
        probabilities=probabilities, uncalibrated=uncalibrated, logits=logits,
        images_per_s=n / elapsed if elapsed > 0 and n else 0.0)


class OnnxLogits(torch.nn.Module):
    """An ``.onnx`` export (:class:`~casd_core.inference.onnx_backend.OrtPredictor`) as a module
    for :func:`predict_outputs`. Its graph ends in softmax(logits / T), so this returns T·log p,
    the logits less a constant per row: softmax of it over T gives back the graph's own p, and
    at T = 1 the uncalibrated scores, with the views, ECE and labels of the torch path."""

    def __init__(self, predictor: Any) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        # a probability 0 gives -inf: softmax keeps it 0
        probabilities = self.predictor.predict(batch.contiguous().cpu().numpy())
        return torch.from_numpy(probabilities).log_().mul_(self.predictor.package.temperature).to(batch.device)


def evaluate_model(model: torch.nn.Module, dataset: SceneDataset, device: torch.device,
                   batch_size: int = 64, with_confusion: bool = False,
                   monitor: Monitor | None = None, workers: int | None = None,
                   temperature: float = 1.0, tta: bool = False) -> dict[str, Any]:
    """The classification report of ``model`` on ``dataset`` (plus the matrix if asked), with
    the expected calibration error of its scores at ``temperature`` (``ece``) and at 1
    (``ece_uncalibrated``), the reliability table behind ``ece`` and the throughput."""
    out = predict_outputs(model, dataset, device, batch_size, monitor, workers, temperature, tta)
    confusion = confusion_matrix(out.labels, out.predicted, len(dataset.class_names))
    report = classification_report(confusion, dataset.class_names)
    report.update(ece=expected_calibration_error(out.probabilities, out.labels),
                  ece_uncalibrated=expected_calibration_error(out.uncalibrated, out.labels),
                  reliability=reliability_table(out.probabilities, out.labels),
                  images_per_s=out.images_per_s)
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


def package_dataset(package: ModelPackage, samples: list[Sample]) -> SceneDataset:
    """``samples`` as ``package``'s training evaluated its images: its bands, value scale, input
    size and normalisation (labels in the package's class order)."""
    transform = build_transforms(package.input_size, package.mean, package.std, train=False)
    bands = package.training.get("bands")  # band indices the model was trained on (multi-band chips)
    return SceneDataset(samples, package.class_names, transform, bands=bands, value_scale=package.value_scale)


def evaluation_model(package: ModelPackage, package_path: str | os.PathLike,
                     device: str = "auto") -> tuple[torch.nn.Module, torch.device]:
    """The module :func:`predict_outputs` runs for ``package`` and the device its batches go to:
    the torch model (channels_last where faster), or for an ``.onnx`` ``package_path`` the
    onnxruntime session on ``device``'s provider, fed from the CPU."""
    prepare_cpu()
    if Path(package_path).suffix.lower() == ".onnx":
        from casd_core.inference.onnx_backend import OrtPredictor

        return OnnxLogits(OrtPredictor.from_file(package_path, device)), torch.device("cpu")
    torch_device = resolve_device(device)
    model = package.build_model().to(torch_device)
    if prefers_channels_last(torch_device):
        model = model.to(memory_format=torch.channels_last)
    return model, torch_device


def evaluate_samples(package: ModelPackage, package_path: str | os.PathLike, samples: list[Sample],
                     batch_size: int = 64, device: str = "auto", monitor: Monitor | None = None,
                     tta: bool = False) -> dict[str, Any]:
    """The report (with its confusion matrix) of ``package`` on ``samples`` (labels in the
    package's class order), prepared as training's evaluation prepares them."""
    model, torch_device = evaluation_model(package, package_path, device)
    return evaluate_model(model, package_dataset(package, samples), torch_device, batch_size, with_confusion=True,
                          monitor=monitor, temperature=package.temperature, tta=tta)


def evaluate_package(package_path: str | os.PathLike, data_root: str | os.PathLike,
                     split_csv: str | os.PathLike, split: str = "test", out_dir: str | os.PathLike | None = None,
                     batch_size: int = 64, device: str = "auto", monitor: Monitor | None = None,
                     tta: bool = False) -> dict[str, Any]:
    """Evaluate a model package on one split of a split CSV (by default its ``test`` rows).

    Images are prepared exactly as during training's evaluation (resize to the package's
    input size, its normalisation), so the test accuracy recorded at training is reproduced.
    Scores are softmax(logits / T) with the package's temperature; ``tta`` averages them over
    the 8 flips and right-angle turns of each image (8x the cost). An ``.onnx`` export runs in
    onnxruntime (:class:`OnnxLogits`) on ``device``'s provider.
    """
    package = ModelPackage.load(package_path)  # an .onnx export's description, without weights
    splits, class_names = read_split(Path(split_csv), Path(data_root))
    if split not in splits:
        raise CasdError(f"{split_csv} has no rows with split={split!r} (it has: {', '.join(sorted(splits))})")
    unknown = sorted(set(class_names) - set(package.class_names))
    if unknown:
        raise CasdError(f"the model does not know the classes {', '.join(unknown)} found in {split_csv}")
    # The CSV's class indices follow its own sorted names; map them onto the package's order.
    to_package = {i: package.class_names.index(name) for i, name in enumerate(class_names)}
    samples = [type(s)(s.path, to_package[s.label]) for s in splits[split]]
    report = evaluate_samples(package, package_path, samples, batch_size, device, monitor, tta)
    report = {"model": str(package_path), "split": split, "split_csv": str(split_csv),
              "temperature": package.temperature, "tta": tta, **report}
    if out_dir is not None:
        report["files"] = {k: str(v) for k, v in write_report(report, package.class_names, Path(out_dir)).items()}
    report.pop("confusion")
    return report
