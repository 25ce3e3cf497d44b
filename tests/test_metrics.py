"""Metrics against hand-computed values; CSV and PNG outputs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from casd_core.metrics import (classification_report, confusion_matrix, most_confused_pairs,
                               plot_confusion_matrix, save_confusion_csv)

NAMES = ["Forest", "River", "Port"]
# rows = true, cols = predicted; 16 samples, 12 on the diagonal.
CONFUSION = np.array([[5, 1, 0],
                      [2, 3, 1],
                      [0, 0, 4]])


def test_confusion_matrix_counts_rows_true_columns_predicted():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 0, 1, 1, 2]
    cm = confusion_matrix(y_true, y_pred, num_classes=4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1], expected[2, 2] = 1, 1, 1, 2, 1
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], num_classes=3)


def test_report_matches_hand_computation():
    report = classification_report(CONFUSION, NAMES)
    assert report["num_samples"] == 16
    assert report["overall_accuracy"] == pytest.approx(12 / 16)
    # Row sums 6, 6, 4; column sums 7, 4, 5 -> p_e = (42 + 24 + 20) / 256 = 86/256.
    p_o, p_e = 12 / 16, 86 / 256
    assert report["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert report["kappa"] == pytest.approx(53 / 85)

    forest, river, port = (report["per_class"][n] for n in NAMES)
    assert (forest["precision"], forest["recall"]) == pytest.approx((5 / 7, 5 / 6))
    assert (river["precision"], river["recall"]) == pytest.approx((3 / 4, 3 / 6))
    assert (port["precision"], port["recall"]) == pytest.approx((4 / 5, 4 / 4))
    assert forest["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert [c["support"] for c in (forest, river, port)] == [6, 6, 4]
    f1s = [c["f1"] for c in (forest, river, port)]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / 3)
    assert report["macro_precision"] == pytest.approx((5 / 7 + 3 / 4 + 4 / 5) / 3)
    assert report["macro_recall"] == pytest.approx((5 / 6 + 3 / 6 + 1) / 3)
    json.dumps(report)  # plain Python numbers only
    assert type(report["num_samples"]) is int and type(report["kappa"]) is float
    assert type(forest["support"]) is int and type(forest["f1"]) is float


def test_zero_support_classes_are_zero_and_out_of_the_macro_average():
    names = ["A", "B", "Unseen", "OnlyPredicted"]
    cm = np.array([[3, 1, 0, 1],
                   [0, 2, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
    report = classification_report(cm, names)
    unseen = report["per_class"]["Unseen"]
    assert unseen == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    only_predicted = report["per_class"]["OnlyPredicted"]
    assert only_predicted == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # "Unseen" is neither true nor predicted anywhere, so it is left out of the macro mean;
    # "OnlyPredicted" was predicted (a false positive), so it counts.
    f1_a = 2 * (3 / 3) * (3 / 5) / (3 / 3 + 3 / 5)
    f1_b = 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)
    assert report["macro_f1"] == pytest.approx((f1_a + f1_b + 0.0) / 3)


def test_degenerate_matrices_give_zeros_not_nan():
    empty = classification_report(np.zeros((2, 2), dtype=int), ["a", "b"])
    assert empty["overall_accuracy"] == 0.0 and empty["kappa"] == 0.0 and empty["macro_f1"] == 0.0
    one_class = classification_report(np.array([[4, 0], [0, 0]]), ["a", "b"])
    assert one_class["overall_accuracy"] == 1.0 and one_class["kappa"] == 0.0  # p_e = 1


def test_report_rejects_mismatched_names():
    with pytest.raises(ValueError):
        classification_report(CONFUSION, NAMES[:2])


def test_most_confused_pairs_ordering():
    cm = np.array([[9, 4, 1],
                   [4, 7, 0],
                   [2, 6, 5]])
    pairs = most_confused_pairs(cm, NAMES, k=3)
    # 6 first; the two 4s in matrix order (Forest->River before River->Forest).
    assert pairs == [("Port", "River", 6), ("Forest", "River", 4), ("River", "Forest", 4)]
    assert all(type(count) is int for *_, count in pairs)
    assert len(most_confused_pairs(cm, NAMES, k=100)) == 5  # empty cells and diagonal left out
    assert most_confused_pairs(np.diag([3, 3, 3]), NAMES) == []


def test_confusion_csv(tmp_path):
    path = save_confusion_csv(CONFUSION, NAMES, tmp_path / "sub" / "confusion.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 1 + len(NAMES) and all(len(r) == 1 + len(NAMES) for r in rows)
    assert rows[0][1:] == NAMES
    assert [r[0] for r in rows[1:]] == NAMES
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), CONFUSION)
    assert os.listdir(path.parent) == ["confusion.csv"]  # no temp file left behind


def test_confusion_png_for_thirty_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"Class{i:02d}" for i in range(30)]
    cm = rng.integers(0, 4, size=(30, 30)) + np.diag(rng.integers(20, 60, size=30))
    cm[5] = 0  # a class without test samples must not break the row normalisation
    path = plot_confusion_matrix(cm, names, tmp_path / "confusion.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 1000 and height >= 1000  # 30 class names need room
    plot_confusion_matrix(cm[:3, :3], names[:3], path, normalize=False, title="counts")
    with Image.open(path) as image:
        image.verify()
    assert os.listdir(tmp_path) == ["confusion.png"]
