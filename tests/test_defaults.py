"""Training defaults are the shipped model's recipe, and the study's rows keep their meaning.

``TrainConfig()`` / ``LossConfig()`` must give what made
``resources/models/casd_aid_default.safetensors`` (its ``training`` metadata records the full
config), so a bare ``casd train --data … --split … --out …`` reproduces it. The study's TOML
rows fill unset values from those defaults, so each default that changes must be stated in
the rows that relied on it: a changed config would refuse to resume the study's runs
(``Trainer.resume`` compares config fingerprints).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from safetensors import safe_open

from casd_core.experiment import load_row, train_config
from casd_core.losses import LossConfig
from casd_core.package import METADATA_KEY
from casd_core.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "resources" / "models" / "casd_aid_default.safetensors"
EXPERIMENTS = REPO / "experiments"
ROWS = sorted(EXPERIMENTS.rglob("*.toml"))

# Settings that describe one run's data, seed or hardware rather than the recipe: the shipped
# model's values (its paths, seed 2, cuda, 3 workers, AID's 120 m tiles) are not defaults.
NOT_RECIPE = {"data_root", "split_csv", "out_dir", "seed", "device", "workers", "tile_footprint_m"}

# The defaults before they became the recipe (the study ran with these; do not edit).
OLD_TRAIN_DEFAULTS = {
    "method": "casd", "backbone": "efficientnet_lite0", "pretrained": "imagenet", "epochs": 10,
    "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "warmup_epochs": 1.0, "input_size": 150,
    "val_fraction": 0.1, "negatives": "centroid", "subset_per_class": None,
    "package_name": "model.safetensors", "bands": None, "value_scale": None, "gsd_m": None,
    "tile_footprint_m": None,
}
OLD_LOSS_DEFAULTS = {
    "temperature": 4.0, "distill_weight": 1.0, "label_smoothing": 0.0, "detach_partner": True,
    "distance": "kl", "partner_ce": True, "alpha_mode": "learnable", "alpha_init": 0.5,
    "alpha_min": 0.0, "alpha_max": 2.0, "alpha_target_active": 0.1,
}
# Seed-0 fingerprints of every row (data root /data, runs /runs) computed with the old
# defaults: a changed one means that row's interrupted runs no longer resume.
STUDY_FINGERPRINTS = {
    "aid20/base.toml": "782f0e38b9fd5141",
    "aid20/casd.toml": "30b1fee7ca50c470",
    "aid20/casd_alpha_adaptive.toml": "42fd27efe7368c31",
    "aid20/casd_alpha_fixed_0.02.toml": "e565f325e73f0b17",
    "aid20/casd_alpha_fixed_0.1.toml": "e3809217e7dfeacd",
    "aid20/casd_alpha_fixed_0.3.toml": "d16dc4a9f52f9e32",
    "aid20/casd_lambda_2.toml": "7b78645ea343710c",
    "aid20/casd_negatives_confusion.toml": "680fe09328018e1b",
    "aid20/casd_negatives_random.toml": "4facb530047a40d4",
    "aid20/casd_temperature_2.toml": "4c545375fd6a0c9e",
    "aid20/ce.toml": "ad5122f98cb8393e",
    "aid20/cskd.toml": "c9ce0e870eac86d4",
    "aid20_224/casd.toml": "bd00344db1a98856",
    "aid20_224/ce.toml": "c3b289896b53853d",
    "aid20_224/cskd.toml": "8d06efffb6a4ca27",
    # issue 14's rows (fixed validation carve), pinned when they were added
    "aid20_224v/base.toml": "84bd0cf8621e294c",
    "aid20_224v/casd.toml": "1424c45598cac5db",
    "aid20_224v/casd_alpha_fixed_0.1.toml": "94eb1b6011ac24df",
    "aid20_224v/casd_distill_cosine.toml": "33a88d63538e42b7",
    "aid20_224v/casd_negatives_confusion.toml": "e986973cdc0ed04b",
    "aid20_224v/ce.toml": "bbc13e03fe4ed719",
    "aid20_224v/cskd.toml": "6f2a9c361d4f0781",
    "aid20_224v/lite2_ce.toml": "744e451145ad871c",
    "bf16/ce.toml": "8e2b50449723f92b",  # aid20_224v/bf16/: CE seed 0 in bfloat16, a check
    "aid50_224v/base.toml": "fa79e6a8ab564ddb",
    "aid50_224v/ce.toml": "f5153eeb2ee75ab4",
}


def _row_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The shipped package's training config (header metadata only; no weights read)."""
    with safe_open(str(SHIPPED), "pt") as handle:
        training = dict(json.loads(handle.metadata()[METADATA_KEY])["training"])
    training.pop("history")
    return training


def _defaults() -> dict:
    return TrainConfig(data_root=Path("data"), split_csv=None, out_dir=Path("out")).to_json()


def test_every_setting_is_recorded_or_declared_not_part_of_the_recipe(recorded: dict) -> None:
    train_fields = {f.name for f in fields(TrainConfig)}
    assert NOT_RECIPE <= train_fields
    # fields added after the study (fine-tuning) are not part of the shipped recipe
    after_study = {f.name for f in fields(TrainConfig) if f.metadata.get("after_study")}
    assert set(recorded) == train_fields - after_study, \
        "a TrainConfig field was added or removed: decide its recipe value"
    assert set(recorded["loss"]) == {f.name for f in fields(LossConfig) if not f.metadata.get("after_study")}


def test_defaults_are_the_shipped_models_recipe(recorded: dict) -> None:
    defaults = _defaults()
    for name in sorted(set(recorded) - NOT_RECIPE - {"loss"}):
        assert defaults[name] == recorded[name], f"TrainConfig.{name}"
    for name, value in recorded["loss"].items():
        assert defaults["loss"][name] == value, f"LossConfig.{name}"
    assert LossConfig() == LossConfig(**recorded["loss"])


def test_the_recipe_row_reproduces_the_shipped_config(recorded: dict) -> None:
    """``casd experiment experiments/aid20_224/casd.toml --seeds 2`` (the model card's command)
    builds exactly the recorded config, paths included."""
    row = load_row(EXPERIMENTS / "aid20_224" / "casd.toml")
    cfg = train_config(row, recorded["seed"], Path("/root/runs"), Path("/root/casd_data"))
    assert cfg.fingerprint() == TrainConfig(**recorded).fingerprint()


def _old_config(path: Path, seed: int, data_root: Path, runs: Path) -> TrainConfig:
    """What ``train_config`` built for the row under the old defaults, stated in full."""
    settings = dict(load_row(path).settings)
    loss = {**OLD_LOSS_DEFAULTS, "method": settings.get("method", "casd"), **settings.pop("loss", {})}
    data, split = settings.pop("data", "aid150"), settings.pop("split", None)
    return TrainConfig(data_root=data_root / data, split_csv=data_root / split if split else None,
                       out_dir=load_row(path).run_dir(runs, seed), seed=seed, loss=LossConfig(**loss),
                       **{**OLD_TRAIN_DEFAULTS, **settings})


@pytest.mark.parametrize("path", ROWS, ids=_row_id)
def test_study_rows_resolve_as_they_did_under_the_old_defaults(path: Path) -> None:
    row = load_row(path)
    data_root, runs = Path("/data"), Path("/runs")
    for seed in row.seeds:
        cfg = train_config(row, seed, runs, data_root)
        assert cfg.to_json() == _old_config(path, seed, data_root, runs).to_json()
    assert train_config(row, 0, runs, data_root).fingerprint() == STUDY_FINGERPRINTS[_row_id(path)]


def test_every_row_has_a_recorded_fingerprint() -> None:
    assert {_row_id(path) for path in ROWS} == set(STUDY_FINGERPRINTS)
