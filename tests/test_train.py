"""Real training on a small stratified AID subset: learning, reproducible evaluation, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casd_core.cli import main
from casd_core.package import ModelPackage
from casd_core.train import TrainConfig
from helpers import small_split


@pytest.fixture(scope="module")
def casd_run(aid_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`casd train --method casd` for two short epochs on 10 train images per class (at the
    images' own 150 px, not the 224-px default, to stay fast on 2 cores)."""
    work = tmp_path_factory.mktemp("casd_run")
    split = small_split(aid_root, work, train_per_class=10, test_per_class=5)
    out = work / "run"
    code = main(["train", "--data", str(aid_root), "--split", str(split), "--method", "casd",
                 "--backbone", "efficientnet_lite0", "--epochs", "2", "--batch-size", "16",
                 "--input-size", "150", "--val-fraction", "0.2", "--out", str(out)])
    assert code == 0
    return out, split


def test_short_casd_run_beats_chance_by_a_wide_margin(casd_run: tuple[Path, Path]) -> None:
    out, _ = casd_run
    package = ModelPackage.load(out / "model.safetensors")
    chance = 1 / 30
    assert package.metrics["test"]["num_samples"] == 150
    assert package.metrics["test"]["overall_accuracy"] > 8 * chance
    assert package.num_classes == 30 and package.training["method"] == "casd"


def test_run_packages_a_validation_temperature_and_training_pixel_stats(casd_run: tuple[Path, Path]) -> None:
    out, _ = casd_run
    package = ModelPackage.load(out / "model.safetensors")
    assert package.temperature > 0 and package.temperature != 1.0
    validation, test = package.metrics["validation"], package.metrics["test"]
    assert validation["nll_after"] <= validation["nll_before"] + 1e-9
    for value in (validation["ece_before"], validation["ece_after"], test["ece"], test["ece_uncalibrated"]):
        assert 0 <= value <= 1
    stats = package.pixel_stats
    assert stats["percentiles"] == [0.5, 99.5] and len(stats["mean"]) == 3
    assert all(0 <= low < mean < high <= 255 for low, mean, high in zip(stats["low"], stats["mean"], stats["high"]))


def test_run_writes_log_with_alpha_and_loss_terms_and_confusion_plot(casd_run: tuple[Path, Path]) -> None:
    out, _ = casd_run
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    for key in ("train_ce", "train_pull", "train_margin", "train_alpha", "val_accuracy", "lr", "images_per_s"):
        assert key in log[0], key
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "confusion_matrix.csv").read_text().splitlines()) == 31


def test_evaluate_reproduces_the_recorded_test_accuracy(casd_run: tuple[Path, Path], aid_root: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out, split = casd_run
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors"), "--data", str(aid_root), "--split", str(split),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    recorded = ModelPackage.load(out / "model.safetensors").metrics["test"]
    assert report["overall_accuracy"] == recorded["overall_accuracy"]
    assert report["kappa"] == recorded["kappa"]
    assert report["ece"] == pytest.approx(recorded["ece"], abs=1e-6)
    assert report["ece_uncalibrated"] == pytest.approx(recorded["ece_uncalibrated"], abs=1e-6)
    assert set(report["per_class"]) == set(ModelPackage.load(out / "model.safetensors").class_names)


def test_rerunning_a_finished_run_does_nothing(casd_run: tuple[Path, Path], aid_root: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out, split = casd_run
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--data", str(aid_root), "--split", str(split), "--method", "casd", "--epochs", "2",
                 "--batch-size", "16", "--input-size", "150", "--val-fraction", "0.2", "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_a_different_config_in_the_same_folder_is_refused(casd_run: tuple[Path, Path], aid_root: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out, split = casd_run
    assert main(["train", "--data", str(aid_root), "--split", str(split), "--method", "ce", "--epochs", "2",
                 "--out", str(out)]) == 2
    assert "different settings" in capsys.readouterr().err


def test_kill_9_mid_epoch_then_rerun_resumes(aid_root: Path, tmp_path: Path) -> None:
    split = small_split(aid_root, tmp_path, train_per_class=6, test_per_class=1)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "casd_core.cli", "train", "--data", str(aid_root), "--split", str(split),
               "--method", "cskd", "--epochs", "2", "--batch-size", "8", "--input-size", "150", "--out", str(out)]
    log = out / "metrics.jsonl"
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert victim.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # well inside epoch 2
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    first_epoch = log.read_text().splitlines()[0]
    assert not (out / "model.safetensors").exists() and not (out / "result.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    lines = log.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert lines[0] == first_epoch
    assert ModelPackage.load(out / "model.safetensors").metrics["validation"]["best_epoch"] in (1, 2)
    assert not list(out.glob(".*.tmp"))
    # a finished run is marked by result.json; a run trained before it existed gets one on rerun
    result = (out / "result.json").read_text()
    (out / "result.json").unlink()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained" in again.stdout + again.stderr
    assert (out / "result.json").read_text() == result


def test_four_band_geotiff_chips_train_and_evaluate(rasters: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """RGB+NIR chips cut from the real NAIP tile train a 4-band model end to end."""
    import rasterio
    from rasterio.windows import Window

    data = tmp_path / "chips"
    rows = []
    with rasterio.open(rasters / "m_4709963_se_14_1_20200831.tif") as src:
        profile = {**src.profile, "width": 48, "height": 48, "tiled": False, "compress": None}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        for label, row_offset in (("north", 100), ("south", 550)):
            (data / label).mkdir(parents=True)
            for i in range(5):
                window = Window(100 + 120 * i, row_offset, 48, 48)
                path = data / label / f"chip_{i}.tif"
                with rasterio.open(path, "w", **{**profile, "transform": src.window_transform(window)}) as dst:
                    dst.write(src.read(window=window))
                rows.append({"path": f"{label}/chip_{i}.tif", "label": label, "split": "test" if i == 4 else "train"})
    split = data / "split.csv"
    with split.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--split", str(split), "--method", "casd", "--epochs", "1",
                 "--batch-size", "4", "--input-size", "48", "--val-fraction", "0.25", "--out", str(out)]) == 0
    package = ModelPackage.load(out / "model.safetensors")
    assert package.in_channels == 4 and len(package.mean) == 4 and package.value_scale == 255.0
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors"), "--data", str(data), "--split", str(split), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 2
    assert report["overall_accuracy"] == package.metrics["test"]["overall_accuracy"]


def test_without_validation_rows_the_last_epoch_is_the_model(aid_root: Path, tmp_path: Path, capsys) -> None:
    """No validation rows: nothing to select on, so the package holds the last epoch's weights
    (not the first's, as an empty validation set's 0 % once made it)."""
    import torch

    split = small_split(aid_root, tmp_path, train_per_class=2, test_per_class=0)
    out = tmp_path / "run"
    assert main(["train", "--data", str(aid_root), "--split", str(split), "--out", str(out), "--method", "ce",
                 "--epochs", "2", "--input-size", "32", "--batch-size", "16", "--val-fraction", "0",
                 "--device", "cpu"]) == 0
    assert "no validation rows: the model is the last epoch's (2)" in capsys.readouterr().out
    package = ModelPackage.load(out / "model.safetensors")
    assert package.metrics["validation"]["overall_accuracy"] is None
    assert package.metrics["validation"]["best_epoch"] == 2
    last = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    for name, value in package.state_dict.items():
        torch.testing.assert_close(value, last[name].to(value.dtype), msg=name)


# -- issue 14: one validation carve for every seed, a scheduled distillation weight -------------

def _config(aid_root: Path, split: Path, out: Path, **changes) -> TrainConfig:
    settings = {"method": "cskd", "pretrained": None, "input_size": 32, "batch_size": 16, "val_fraction": 0.2,
                "device": "cpu", "workers": 0, **changes}
    return TrainConfig(data_root=aid_root, split_csv=split, out_dir=out, **settings)


def test_a_fixed_val_seed_gives_every_seed_the_same_validation_rows(aid_root: Path, tmp_path: Path) -> None:
    """Seeds 0 and 1 with val_seed 7 validate on the same images and train on the same ones,
    in another order and from other initial weights; without val_seed the carve follows the
    seed, as it always did."""
    import torch

    from casd_core.data import training_rows
    from casd_core.train import Trainer

    split = small_split(aid_root, tmp_path, train_per_class=10, test_per_class=1)
    trainers = {(seed, val_seed): Trainer(_config(aid_root, split, tmp_path / f"{seed}-{val_seed}", seed=seed,
                                                  val_seed=val_seed))
                for seed, val_seed in ((0, 7), (1, 7), (0, None), (1, None))}

    def paths(dataset) -> list[Path]:
        return [sample.path for sample in dataset.samples]

    def order(trainer: Trainer) -> list[Path]:
        trainer.sampler.set_epoch(0)
        return [trainer.data.train.samples[anchor].path for anchor, _, _ in trainer.sampler]

    fixed_0, fixed_1 = trainers[0, 7], trainers[1, 7]
    assert len(fixed_0.data.val) == 60 and paths(fixed_0.data.val) == paths(fixed_1.data.val)
    assert paths(fixed_0.data.train) == paths(fixed_1.data.train)
    assert paths(fixed_0.data.val) == [s.path for s in training_rows(aid_root, split, 0.2, 7).val]
    assert order(fixed_0) != order(fixed_1) and sorted(order(fixed_0)) == sorted(order(fixed_1))
    assert not torch.equal(fixed_0.model.head.weight, fixed_1.model.head.weight)
    for seed in (0, 1):  # val_seed None: today's carve, drawn with the run's seed
        assert paths(trainers[seed, None].data.val) == [s.path for s in training_rows(aid_root, split, 0.2, seed).val]
    assert paths(trainers[0, None].data.val) != paths(trainers[1, None].data.val)


def test_new_settings_at_their_defaults_keep_old_fingerprints(aid_root: Path, tmp_path: Path) -> None:
    """val_seed None and a constant λ leave a run's fingerprint as it was before they existed
    (pinned in tests/test_finetune.py), so the study's runs and the shipped recipe still resume;
    setting either makes another run."""
    from dataclasses import replace

    from casd_core.losses import LossConfig

    base = TrainConfig(data_root=Path("/data/aid150"), split_csv=Path("/data/aid150/split_20.csv"),
                       out_dir=Path("/runs/x"))
    assert base.fingerprint() == "f8e268d89899888a"
    same = replace(base, val_seed=None, loss=LossConfig(distill_schedule="constant"), precision="auto")
    assert same.fingerprint() == base.fingerprint()
    changed = {replace(base, val_seed=0).fingerprint(), replace(base, val_seed=1).fingerprint(),
               replace(base, loss=LossConfig(distill_schedule="cosine")).fingerprint(),
               replace(base, precision="bf16").fingerprint(), base.fingerprint()}
    assert len(changed) == 5


def test_cosine_schedule_and_fixed_carve_train_log_and_package(aid_root: Path, tmp_path: Path) -> None:
    """`casd train --distill-schedule cosine --val-seed 3`: the log shows λ falling epoch by
    epoch as the mean of λ_t over each epoch's steps, the package records both settings, and
    `casd calibrate`'s replay of the carve finds the very validation rows the run used."""
    import math

    from casd_core.calibration import replayed_rows
    from casd_core.data import training_rows

    split = small_split(aid_root, tmp_path, train_per_class=4, test_per_class=1)
    out = tmp_path / "run"
    assert main(["train", "--data", str(aid_root), "--split", str(split), "--out", str(out), "--method", "cskd",
                 "--epochs", "2", "--input-size", "32", "--batch-size", "16", "--val-fraction", "0.25",
                 "--seed", "1", "--val-seed", "3", "--distill-weight", "2", "--distill-schedule", "cosine",
                 "--pretrained", "none", "--device", "cpu", "--workers", "0"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = 90 // 16  # 30 classes x 3 training images, full batches only
    weights = [2 * 0.5 * (1 + math.cos(math.pi * step / (2 * steps))) for step in range(2 * steps)]
    for epoch, entry in enumerate(log):
        assert entry["train_distill_weight"] == pytest.approx(sum(weights[epoch * steps:(epoch + 1) * steps]) / steps)
    assert 0 < log[1]["train_distill_weight"] < log[0]["train_distill_weight"] < 2
    package = ModelPackage.load(out / "model.safetensors")
    assert (package.training["seed"], package.training["val_seed"]) == (1, 3)
    assert package.training["loss"]["distill_schedule"] == "cosine"
    carved = training_rows(aid_root, split, 0.25, 3).val
    assert [s.path for s in replayed_rows(package, out, aid_root, split).val] == [s.path for s in carved]
    assert package.metrics["validation"]["num_samples"] == len(carved) == 30
    assert carved != training_rows(aid_root, split, 0.25, 1).val


def test_bf16_precision_autocasts_the_forward_pass_and_keeps_float32_weights(aid_root: Path, tmp_path: Path) -> None:
    """`--precision bf16` on CPU: the convolutions run in bfloat16 while the weights, their
    update and the package stay float32; `auto` (the default) stays float32 on CPU; an
    unknown precision is one clear error."""
    import torch

    from casd_core.errors import CasdError
    from casd_core.losses import LossConfig, build_loss
    from casd_core.models import build_model
    from casd_core.train import training_step

    model = build_model("efficientnet_lite0", 30, pretrained=None).train()
    loss = build_loss(LossConfig(method="ce"), 30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = {"anchor": torch.rand(4, 3, 32, 32), "anchor_label": torch.tensor([0, 1, 2, 3])}
    seen: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = first_conv.weight.detach().clone()
    for precision in ("bf16", "auto"):
        training_step(model, loss, optimizer, scaler, batch, torch.device("cpu"), precision=precision)
    assert seen == [torch.bfloat16, torch.float32]
    assert first_conv.weight.dtype == torch.float32 and not torch.equal(first_conv.weight, before)

    split = small_split(aid_root, tmp_path, train_per_class=4, test_per_class=1)
    args = ["train", "--data", str(aid_root), "--split", str(split), "--out", str(tmp_path / "run"), "--method",
            "casd", "--epochs", "1", "--input-size", "32", "--batch-size", "16", "--pretrained", "none",
            "--device", "cpu", "--workers", "0"]
    assert main(args + ["--precision", "bf16"]) == 0
    package = ModelPackage.load(tmp_path / "run" / "model.safetensors")
    assert package.training["precision"] == "bf16"
    assert {tensor.dtype for tensor in package.state_dict.values() if tensor.is_floating_point()} == {torch.float32}
    with pytest.raises(CasdError, match="unknown precision 'fp16'; use one of auto, fp32, bf16"):
        TrainConfig(data_root=aid_root, split_csv=split, out_dir=tmp_path / "other", precision="fp16")
