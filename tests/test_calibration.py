"""Temperature scaling, ECE, pixel statistics and `casd calibrate` on a small real package."""

from __future__ import annotations

import math

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from casd_core.calibration import (calibrate_package, expected_calibration_error, fit_temperature,
                                   negative_log_likelihood, reliability_table)
from casd_core.cli import main
from casd_core.data import SceneDataset, build_transforms, pixel_statistics, read_split, training_rows
from casd_core.errors import CasdError
from casd_core.evaluate import evaluate_package, predict_outputs
from casd_core.package import ModelPackage
from helpers import build_test_package, small_split


def _toy_logits(true_temperature: float, n: int = 20000, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z): z is calibrated, z * T is calibrated after dividing by T."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, classes, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
    return z * true_temperature, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature: float) -> None:
    logits, labels = _toy_logits(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    assert fit_temperature(logits, labels) == fitted  # deterministic
    assert negative_log_likelihood(logits, labels, fitted) <= negative_log_likelihood(logits, labels, 1.0) + 1e-12
    calibrated = torch.softmax(logits / fitted, 1)
    assert expected_calibration_error(calibrated, labels) < 0.02


def test_fit_temperature_edge_cases() -> None:
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    # All right: the NLL only falls as T -> 0, evidence of nothing, so T stays 1.
    assert fit_temperature(torch.eye(5) * 5, torch.arange(5)) == 1.0
    one_wrong = fit_temperature(torch.eye(5) * 5, torch.tensor([0, 1, 2, 3, 0]))
    assert 1.0 < one_wrong < math.exp(5)  # confident and once wrong: softer


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 samples at confidence 0.6 of which 6 right, 10 at 0.9 of which 9 right: perfectly calibrated
    probabilities = np.array([[0.6, 0.4]] * 10 + [[0.1, 0.9]] * 10)
    labels = np.array([0] * 6 + [1] * 4 + [1] * 9 + [0])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)
    # all at 0.9 but only 60 % right: ECE is the gap, 0.3
    assert expected_calibration_error(np.array([[0.9, 0.1]] * 10), np.array([0] * 6 + [1] * 4)) == pytest.approx(0.3)
    table = reliability_table(probabilities, labels, bins=10)
    assert [row["count"] for row in table if row["count"]] == [10, 10]
    assert sum(row["count"] for row in table) == 20 and table[0]["accuracy"] is None
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0)) == 0.0


def test_pixel_statistics_of_real_aid_images(aid_root: Path) -> None:
    splits, _ = read_split(aid_root / "split_20.csv", aid_root)
    stats = pixel_statistics(splits["train"], max_images=100, seed=0)
    assert stats["percentiles"] == [0.5, 99.5]
    assert set(stats) == {"percentiles", "low", "high", "mean", "std"}
    for key in ("low", "high", "mean", "std"):
        assert len(stats[key]) == 3
    for low, high, mean, std in zip(stats["low"], stats["high"], stats["mean"], stats["std"]):
        assert 0 <= low < 40 < mean < 160 < high <= 255  # raw uint8, not the 0-1 network input
        assert 25 < std < 90
    assert pixel_statistics(splits["train"], max_images=100, seed=0) == stats
    dataset = SceneDataset(splits["train"][:20], [], None)
    assert pixel_statistics(dataset) == pixel_statistics([s.path for s in splits["train"][:20]])


@pytest.fixture(scope="module")
def trained_like_package(aid_root: Path, tmp_path_factory: pytest.TempPathFactory,
                         one_torch_thread) -> tuple[Path, Path]:
    """The tiny AID package (64 px, ImageNet trunk) "trained" on a small real split (seed 1,
    20 % validation): its head is the nearest class centroid of the training rows' features,
    a real if weak classifier, so its fitted temperature is a real one."""
    work = tmp_path_factory.mktemp("calibrate")
    split = small_split(aid_root, work, train_per_class=5, test_per_class=2)
    package = ModelPackage.load(build_test_package(work / "tiny.safetensors"))
    rows = training_rows(aid_root, split, 0.2, 1)
    transform = build_transforms(package.input_size, package.mean, package.std, train=False)
    model = package.build_model()
    with torch.inference_mode():
        images = torch.stack([SceneDataset(rows.train, package.class_names, transform)[i][0]
                              for i in range(len(rows.train))])
        features = torch.nn.functional.normalize(model.features(images), dim=1)
    labels = torch.tensor([s.label for s in rows.train])
    centroids = torch.stack([features[labels == c].mean(0) for c in range(package.num_classes)])
    package.state_dict["head.weight"] = torch.nn.functional.normalize(centroids, dim=1)
    package.state_dict["head.bias"] = torch.zeros(package.num_classes)
    package.training = {"seed": 1, "val_fraction": 0.2, "subset_per_class": None, "bands": None}
    package.metrics = {"validation": {"overall_accuracy": 0.5, "num_samples": 30},
                       "test": {"overall_accuracy": 0.5, "num_samples": 60}}
    return package.save(work / "tiny.safetensors"), split


def test_calibrate_package_keeps_every_label_and_fits_on_validation_only(
        trained_like_package: tuple[Path, Path], aid_root: Path, tmp_path: Path) -> None:
    source, split = trained_like_package
    out = tmp_path / "calibrated.safetensors"
    report = calibrate_package(source, aid_root, split, out, device="cpu")
    before, after = ModelPackage.load(source), ModelPackage.load(out)
    assert before.temperature == 1.0 and after.temperature == report["temperature"] != 1.0
    assert report["validation"]["num_samples"] == 30 and report["test"]["num_samples"] == 60
    assert report["validation"]["nll_after"] <= report["validation"]["nll_before"] + 1e-9
    assert report["test"]["ece"] < report["test"]["ece_uncalibrated"]  # held-out rows: better scores
    assert after.metrics["test"]["ece"] == report["test"]["ece"]
    assert after.metrics["test"]["overall_accuracy"] == 0.5  # the recorded numbers stay
    assert after.pixel_stats is not None and len(after.pixel_stats["mean"]) == 3
    assert all(torch.equal(before.state_dict[k], after.state_dict[k]) for k in before.state_dict)

    # the temperature was fitted on exactly the rows training carved as validation
    rows = training_rows(aid_root, split, 0.2, 1)
    transform = build_transforms(after.input_size, after.mean, after.std, train=False)
    val = predict_outputs(after.build_model(), SceneDataset(rows.val, after.class_names, transform),
                          torch.device("cpu"))
    assert fit_temperature(val.logits, val.labels) == pytest.approx(after.temperature, rel=1e-6)
    assert not {s.path for s in rows.val} & {s.path for s in rows.test}

    # every test label is the same with and without the temperature
    old = evaluate_package(source, aid_root, split, device="cpu")
    new = evaluate_package(out, aid_root, split, device="cpu")
    assert new["overall_accuracy"] == old["overall_accuracy"] and new["kappa"] == old["kappa"]
    assert new["ece"] == pytest.approx(report["test"]["ece"], abs=1e-4)
    assert new["ece_uncalibrated"] == pytest.approx(old["ece"], abs=1e-6)


def test_casd_calibrate_in_place_and_against_the_wrong_split(trained_like_package: tuple[Path, Path],
                                                             aid_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    source, split = trained_like_package
    model = tmp_path / "model.safetensors"
    model.write_bytes(source.read_bytes())
    assert main(["calibrate", str(model), "--data", str(aid_root), "--split", str(split), "-o", str(model),
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert ModelPackage.load(model).temperature == report["temperature"] != 1.0
    assert not list(tmp_path.glob(".*.tmp"))

    other = small_split(aid_root, tmp_path, train_per_class=10, test_per_class=1)  # 2 val rows a class
    assert main(["calibrate", str(model), "--data", str(aid_root), "--split", str(other), "-o",
                 str(tmp_path / "x.safetensors"), "--device", "cpu"]) == 2
    assert "--split" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

    untracked = ModelPackage.load(model)
    untracked.training = {}
    untracked.save(tmp_path / "untracked.safetensors")
    with pytest.raises(CasdError, match="validation rows are unknown"):
        calibrate_package(tmp_path / "untracked.safetensors", aid_root, split, tmp_path / "y.safetensors")


def test_evaluate_with_tta_reports_calibration(trained_like_package: tuple[Path, Path], aid_root: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    source, split = trained_like_package
    assert main(["evaluate", str(source), "--data", str(aid_root), "--split", str(split), "--tta",
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta"] is True and report["num_samples"] == 60
    assert 0 <= report["ece"] <= 1 and report["ece"] == report["ece_uncalibrated"]  # T = 1
    assert sum(row["count"] for row in report["reliability"]) == 60 and report["images_per_s"] > 0
