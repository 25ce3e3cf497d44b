"""Confidence you can act on: temperature scaling and the expected calibration error.

A network trained with cross-entropy (here also with label smoothing and self-distillation)
ranks classes well but its softmax scores need not be probabilities: a score of 0.9 should be
right 9 times in 10. *Temperature scaling* (C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On
Calibration of Modern Neural Networks", ICML 2017, sec. 4.2) fixes that with one number fitted
on held-out data: the scores become softmax(logits / T), with T > 0 minimising the negative
log-likelihood of the validation labels. Dividing by T never changes the arg-max, so the
labels (and the accuracy) stay exactly the same; only the scores move.

How far scores are from probabilities is measured by the *expected calibration error* (M. P.
Naeini, G. F. Cooper, M. Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian
Binning", AAAI 2015; the form of Guo et al. 2017, eq. 3): the top-1 confidences are put into
equal-width bins and ECE = sum over bins of |B|/n * |accuracy(B) - mean confidence(B)|.

:func:`calibrate_package` re-packages a trained model with a temperature fitted on the very
validation rows its training carved (never a test row) and the pixel statistics of its
training rows (``casd calibrate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from casd_core.errors import CasdError, param
from casd_core.progress import Monitor

if TYPE_CHECKING:
    from casd_core.data import TrainingRows
    from casd_core.package import ModelPackage

ECE_BINS = 15  # Guo et al. 2017 report ECE with 15 bins
_LOG_T_RANGE = (-5.0, 5.0)  # T in [0.0067, 148]: beyond that the data say "T -> 0 or inf"


def _as_logits_and_labels(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if logits.numel() and (logits.dim() != 2 or logits.shape[0] != labels.shape[0]):
        raise ValueError(f"logits {tuple(logits.shape)} do not fit {labels.shape[0]} labels")
    return logits, labels


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean NLL of the labels under softmax(logits / temperature) (0.0 for no samples)."""
    logits, labels = _as_logits_and_labels(logits, labels)
    if not labels.numel():
        return 0.0
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    L-BFGS on log T (so T stays positive) in float64, starting from T = 1: deterministic for
    the same inputs. T is kept within [e^-5, e^5]. Returns 1.0 (no change) for empty input and
    for a set the model gets entirely right: there the NLL falls as T -> 0 whatever the model's
    real error rate, so it says nothing about calibration (a fine-tune with 27 validation
    chips, all right, was fitted T = 0.01: every later tile scored 1.00).
    """
    logits, labels = _as_logits_and_labels(logits, labels)
    if not labels.numel() or bool((logits.argmax(1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        temperature = log_t.clamp(*_LOG_T_RANGE).exp()
        loss = torch.nn.functional.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = math.exp(float(log_t.detach().clamp(*_LOG_T_RANGE)))
    return temperature if math.isfinite(temperature) else 1.0


def _confidences(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence of each sample and whether its top-1 class is right."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probabilities.size == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities {probabilities.shape} do not fit {labels.shape[0]} labels")
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == labels


def reliability_table(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin ``(lower, upper]`` (the first also holds 0): how many
    samples, their mean top-1 confidence and their accuracy (``None`` for an empty bin). The
    data of a reliability diagram (Guo et al. 2017, fig. 1)."""
    confidence, correct = _confidences(probabilities, labels)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return rows


def expected_calibration_error(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 scores over ``bins`` equal-width confidence bins (Naeini et al. 2015;
    Guo et al. 2017, eq. 3): sum over bins of |B|/n * |accuracy(B) - confidence(B)|, in [0, 1].
    0.0 for no samples."""
    confidence, correct = _confidences(probabilities, labels)
    if not confidence.size:
        return 0.0
    gap = sum(row["count"] * abs(row["accuracy"] - row["confidence"])
              for row in reliability_table(probabilities, labels, bins) if row["count"])
    return float(gap / confidence.size)


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


def calibration_scores(logits: Any, labels: Any, temperature: float) -> dict[str, float]:
    """ECE and NLL of softmax(logits) (``_before``) and of softmax(logits / T) (``_after``)."""
    logits = np.asarray(logits, dtype=np.float64)
    return {"ece_before": expected_calibration_error(_softmax(logits), labels),
            "ece_after": expected_calibration_error(_softmax(logits, temperature), labels),
            "nll_before": negative_log_likelihood(logits, labels),
            "nll_after": negative_log_likelihood(logits, labels, temperature)}


def fit_on_validation(model: torch.nn.Module, dataset: Any, device: torch.device, batch_size: int = 64,
                      workers: int | None = None, monitor: Monitor | None = None) -> tuple[float, dict[str, Any]]:
    """Fit the temperature of ``model`` on ``dataset`` (the validation rows): ``(T, scores)``
    with the validation ECE and NLL before and after (:func:`calibration_scores`);
    ``(1.0, {})`` without validation rows."""
    from casd_core.evaluate import predict_outputs

    if not len(dataset):
        return 1.0, {}
    out = predict_outputs(model, dataset, device, batch_size, monitor, workers)
    temperature = fit_temperature(out.logits, out.labels)
    return temperature, calibration_scores(out.logits, out.labels, temperature)


def replayed_rows(package: "ModelPackage", package_path: str | os.PathLike, data_root: str | os.PathLike,
                  split_csv: str | os.PathLike | None) -> "TrainingRows":
    """The train/validation/test rows ``package``'s training used, carved again from its
    recorded ``val_fraction``, ``subset_per_class`` and seed: ``val_seed`` when the run fixed
    one, else ``seed`` (a package from before ``val_seed`` existed records none)."""
    from casd_core.data import training_rows

    training = package.training
    if "seed" not in training or "val_fraction" not in training:
        raise CasdError(f"{package_path} does not record the seed and validation share of its training, "
                        "so its validation rows are unknown; retrain it with `casd train`")
    if not training["val_fraction"]:
        raise CasdError(f"{package_path} was trained without validation rows (val_fraction 0): there are "
                        "no held-out rows to fit a temperature on")
    data_seed = training["seed"] if training.get("val_seed") is None else training["val_seed"]
    return training_rows(Path(data_root), Path(split_csv) if split_csv else None, training["val_fraction"],
                         data_seed, training.get("subset_per_class"))


def calibrate_package(package_path: str | os.PathLike, data_root: str | os.PathLike,
                      split_csv: str | os.PathLike | None, out_path: str | os.PathLike,
                      batch_size: int = 64, device: str = "auto",
                      monitor: Monitor | None = None) -> dict[str, Any]:
    """Re-package a trained model with a temperature and pixel statistics (``casd calibrate``).

    The validation rows are carved exactly as the package's training carved them (its
    recorded ``val_seed`` or else ``seed``, ``val_fraction`` and ``subset_per_class``, through
    :func:`casd_core.data.training_rows`): T is fitted on them only, never on a test row, and
    the pixel statistics come from the training rows. The weights are untouched, so every
    label (and the accuracy) is unchanged, which is checked on the test rows, where the ECE
    before and after is measured. ``out_path`` may be ``package_path`` (written atomically).
    Returns a report: ``temperature``, ``validation`` and ``test`` scores, ``pixel_stats``.
    """
    from casd_core.data import pixel_statistics
    from casd_core.evaluate import evaluation_model, package_dataset, predict_outputs
    from casd_core.package import ModelPackage

    package = ModelPackage.load(package_path)
    training = package.training
    split_csv = Path(split_csv) if split_csv else None
    rows = replayed_rows(package, package_path, data_root, split_csv)
    recorded_val = package.metrics.get("validation", {}).get("num_samples")
    if rows.class_names != package.class_names or recorded_val not in (None, len(rows.val)):
        raise CasdError(f"{param('split_csv')} {split_csv} is not the split this model was trained on "
                        f"(its classes or its {len(rows.val)} validation rows differ from the training's "
                        f"{recorded_val}); pass the training's CSV and {param('data_root')}")
    if {s.path for s in rows.val} & {s.path for s in rows.test}:
        raise CasdError(f"{split_csv} lists images both as train and as test rows")

    dataset = functools.partial(package_dataset, package)
    model, torch_device = evaluation_model(package, package_path, device)
    val = predict_outputs(model, dataset(rows.val), torch_device, batch_size, monitor)
    temperature = fit_temperature(val.logits, val.labels)
    validation = calibration_scores(val.logits, val.labels, temperature)
    recorded = package.metrics.get("validation", {})
    report: dict[str, Any] = {"model": str(out_path), "temperature": temperature, "validation": {
        "num_samples": len(rows.val), "overall_accuracy": float((val.predicted == val.labels).mean()),
        "recorded_overall_accuracy": recorded.get("overall_accuracy"), **validation}}
    metrics = {**package.metrics, "validation": {**recorded, **validation}}
    if rows.test:
        out = predict_outputs(model, dataset(rows.test), torch_device, batch_size, monitor)
        accuracy = float((out.predicted == out.labels).mean())
        # argmax is invariant to a positive scale: the calibrated labels are those of T = 1
        calibrated = (out.logits.astype(np.float64) / temperature).argmax(1)
        assert float((calibrated == out.labels).mean()) == accuracy, "the temperature changed a label"
        scores = calibration_scores(out.logits, out.labels, temperature)
        test = {"num_samples": len(rows.test), "overall_accuracy": accuracy,
                "ece_uncalibrated": scores["ece_before"], "ece": scores["ece_after"],
                "nll_uncalibrated": scores["nll_before"], "nll": scores["nll_after"]}
        report["test"] = {**test, "recorded_overall_accuracy": package.metrics.get("test", {}).get("overall_accuracy")}
        metrics["test"] = {**package.metrics.get("test", {}),
                           **{k: test[k] for k in ("ece", "ece_uncalibrated")}}
    pixel_stats = pixel_statistics(dataset(rows.train), seed=training["seed"])
    report["pixel_stats"] = pixel_stats
    dataclasses.replace(package, temperature=temperature, pixel_stats=pixel_stats, metrics=metrics).save(out_path)
    return report
