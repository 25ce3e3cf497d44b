"""Classification metrics from a confusion matrix, and the matrix as CSV and PNG.

Convention: ``confusion[i, j]`` counts samples of true class ``i`` predicted as class ``j``
(rows = truth, columns = prediction). Every number in a report is a plain Python ``int`` or
``float`` so it can go straight into JSON; a ratio with a zero denominator is 0.0.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from casd_core.atomic import atomic_path


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts; rows are true classes, columns predictions."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length ({y_true.size} vs {y_pred.size})")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def classification_report(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy, Cohen's kappa, macro P/R/F1 and per-class P/R/F1/support.

    Macro averages run over the classes that occur in the truth or in the predictions (as
    scikit-learn does without explicit labels), so a class absent from an evaluation split
    does not drag the average down; ``per_class`` still lists every class.
    """
    confusion = _check_confusion(confusion, class_names)
    total = int(confusion.sum())
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    hits = np.diag(confusion)

    observed = _ratio(hits.sum(), total)
    expected = _ratio(float(true_counts @ predicted_counts), float(total) ** 2)
    kappa = _ratio(observed - expected, 1.0 - expected)

    per_class: dict[str, dict[str, float | int]] = {}
    present: list[tuple[float, float, float]] = []
    for i, name in enumerate(class_names):
        precision = _ratio(hits[i], predicted_counts[i])
        recall = _ratio(hits[i], true_counts[i])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": int(true_counts[i])}
        if true_counts[i] or predicted_counts[i]:
            present.append((precision, recall, f1))
    macro = np.mean(present, axis=0).tolist() if present else [0.0, 0.0, 0.0]

    return {
        "overall_accuracy": observed,
        "kappa": kappa,
        "macro_precision": macro[0],
        "macro_recall": macro[1],
        "macro_f1": macro[2],
        "num_samples": total,
        "per_class": per_class,
    }


def most_confused_pairs(confusion: np.ndarray, class_names: Sequence[str],
                        k: int = 10) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as ``(true, predicted, count)``, largest first.

    Ties keep matrix order (by true class, then predicted class); empty cells are left out.
    """
    confusion = _check_confusion(confusion, class_names)
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = off_diagonal.ravel()
    order = np.argsort(-flat, kind="stable")[:max(k, 0)]
    n = len(class_names)
    return [(class_names[i // n], class_names[i % n], int(flat[i])) for i in order if flat[i] > 0]


def save_confusion_csv(confusion: np.ndarray, class_names: Sequence[str],
                       path: str | os.PathLike) -> Path:
    """Write the matrix as CSV: a header of predicted classes, then one row per true class."""
    confusion = _check_confusion(confusion, class_names)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["true \\ predicted", *class_names])
            for name, row in zip(class_names, confusion):
                writer.writerow([name, *(int(v) for v in row)])
    return path


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str],
                          path: str | os.PathLike, normalize: bool = True,
                          title: str | None = None) -> Path:
    """Write the matrix as a PNG heat map with class names on both axes.

    Colours are always row-normalised (recall per true class), so rare and common classes read
    alike. Cells are annotated with the row percentage (``normalize=True``) or the raw count;
    empty cells stay blank. Sized for up to ~50 classes; annotations are dropped beyond 60.
    """
    # The Agg canvas directly, not pyplot: no global backend switch inside a host such as QGIS.
    with warnings.catch_warnings():
        # Next to QGIS, Debian's mpl_toolkits shadows pip's and matplotlib warns that 3-D axes
        # are unavailable; no 3-D plot is drawn here.
        warnings.filterwarnings("ignore", message="Unable to import Axes3D")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    confusion = _check_confusion(confusion, class_names)
    n = len(class_names)
    row_totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, row_totals, out=np.zeros(confusion.shape), where=row_totals > 0)

    side = max(5.0, 2.5 + 0.38 * n)
    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    colorbar.set_label("fraction of the true class")

    label_size = float(np.clip(260 / max(n, 1), 6, 11))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(class_names, rotation=90, fontsize=label_size)
    ax.set_yticklabels(class_names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title is None:
        accuracy = _ratio(np.trace(confusion), confusion.sum())
        kind = "row %" if normalize else "counts"
        title = f"Confusion matrix ({kind}), overall accuracy {accuracy:.1%}"
    ax.set_title(title)

    if n <= 60:
        cell_size = float(np.clip(240 / max(n, 1), 4.5, 10))
        for i in range(n):
            for j in range(n):
                if confusion[i, j] == 0:
                    continue
                text = f"{100 * rates[i, j]:.0f}" if normalize else str(int(confusion[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=cell_size,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def _check_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    confusion = np.asarray(confusion)
    n = len(class_names)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {confusion.shape} does not match {n} class names")
    return confusion.astype(np.int64, copy=False)
