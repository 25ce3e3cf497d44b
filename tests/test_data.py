"""Datasets, splits and transforms on the real AID images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from casd_core.data import (SceneDataset, build_transforms, read_image, read_split, scan_class_folders,
                            stratified_validation_split, subset_per_class)
from casd_core.errors import CasdError


def test_split_csv_matches_the_published_protocol(aid_root: Path) -> None:
    splits, class_names = read_split(aid_root / "split_20.csv", aid_root)
    assert len(class_names) == 30 and class_names == sorted(class_names)
    assert len(splits["train"]) == 2000 and len(splits["test"]) == 7999
    assert not {s.path for s in splits["train"]} & {s.path for s in splits["test"]}


def test_class_folder_scan_agrees_with_the_csv_class_order(aid_root: Path) -> None:
    samples, class_names = scan_class_folders(aid_root)
    assert class_names == read_split(aid_root / "split_20.csv", aid_root)[1]
    assert len(samples) == 9999


def test_validation_split_is_stratified_seeded_and_disjoint(aid_root: Path) -> None:
    splits, _ = read_split(aid_root / "split_20.csv", aid_root)
    labels = [s.label for s in splits["train"]]
    train, val = stratified_validation_split(labels, 0.1, seed=3)
    assert sorted(train + val) == list(range(len(labels)))
    per_class = Counter(labels[i] for i in val)
    totals = Counter(labels)
    assert all(abs(per_class[c] - 0.1 * totals[c]) <= 1 for c in totals)
    assert (train, val) == stratified_validation_split(labels, 0.1, seed=3)
    assert val != stratified_validation_split(labels, 0.1, seed=4)[1]


def test_subset_per_class_caps_every_class(aid_root: Path) -> None:
    splits, _ = read_split(aid_root / "split_20.csv", aid_root)
    subset = subset_per_class(splits["train"], 5, seed=0)
    assert Counter(s.label for s in subset) == {c: 5 for c in range(30)}


def test_jpeg_scene_becomes_a_unit_range_tensor(aid_root: Path) -> None:
    image = read_image(aid_root / "Forest" / "forest_1.jpg")
    assert image.shape == (3, 150, 150) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.01


def test_multiband_uint16_tiff_needs_an_explicit_scale(rasters: Path, tmp_path: Path) -> None:
    with rasterio.open(rasters / "m_4709963_se_14_1_20200831.tif") as src:
        chip = src.read(window=((100, 164), (100, 164))).astype(np.uint16) * 40
        profile = {**src.profile, "dtype": "uint16", "width": 64, "height": 64, "driver": "GTiff", "tiled": False,
                   "compress": None, "nodata": None}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
    path = tmp_path / "chip.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(chip)
    with pytest.raises(CasdError, match="value_scale"):
        read_image(path)
    image = read_image(path, value_scale=10000.0)
    assert image.shape == (4, 64, 64)
    assert torch.allclose(image, torch.from_numpy(chip).float() / 10000.0)
    assert read_image(path, bands=[4, 1], value_scale=10000.0).shape == (2, 64, 64)


def test_training_transforms_keep_size_and_vary(aid_root: Path) -> None:
    torch.manual_seed(0)
    samples, names = scan_class_folders(aid_root)
    dataset = SceneDataset(samples[:1], names, build_transforms(96, [0.5] * 3, [0.5] * 3, train=True))
    first, second = dataset[0][0], dataset[0][0]
    assert first.shape == second.shape == (3, 96, 96)
    assert not torch.equal(first, second)
    evaluation = SceneDataset(samples[:1], names, build_transforms(96, [0.5] * 3, [0.5] * 3, train=False))
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_missing_inputs_are_clear_errors(aid_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CasdError, match="does not exist"):
        read_split(tmp_path / "nope.csv", aid_root)
    with pytest.raises(CasdError, match="does not exist"):
        read_split(aid_root / "split_20.csv", tmp_path)
    with pytest.raises(CasdError, match="does not exist"):
        scan_class_folders(tmp_path / "nothing")
