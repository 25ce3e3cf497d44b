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


@pytest.mark.parametrize("name, train, test", [("split_20.csv", 2000, 7999), ("split_50.csv", 4999, 5000)])
def test_the_shipped_split_files_load_whole(aid_root: Path, name: str, train: int, test: int) -> None:
    splits, _ = read_split(aid_root / name, aid_root)
    assert {k: len(v) for k, v in splits.items()} == {"train": train, "test": test}
    assert all(s.group is None for s in splits["train"][:10])


def _write_csv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("\n".join(",".join(row) for row in rows) + "\n")
    return path


def test_split_values_other_than_train_test_val_are_refused(aid_root: Path, tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "bad.csv", [("path", "label", "split"), ("Forest/forest_1.jpg", "Forest", "train"),
                                                 ("Forest/forest_2.jpg", "Forest", "Test")])
    with pytest.raises(CasdError, match=r"line 3: split 'Test' is not one of train, test, val") as error:
        read_split(csv_path, aid_root)
    assert error.value.params == ["split_csv"]


def test_groups_are_kept_and_val_rows_are_the_validation_set(aid_root: Path, tmp_path: Path) -> None:
    from casd_core.data import training_rows

    rows = [("path", "label", "split", "group")]
    rows += [(f"Forest/forest_{i}.jpg", "Forest", "train", f"polygon:{i // 3}") for i in range(1, 13)]
    rows += [(f"River/river_{i}.jpg", "River", "train", "") for i in range(1, 7)]
    rows += [("River/river_20.jpg", "River", "test", "polygon:9")]
    splits, names = read_split(_write_csv(tmp_path / "grouped.csv", rows), aid_root)
    assert names == ["Forest", "River"] and splits["test"][0].group == "polygon:9"
    assert [s.group for s in splits["train"][:3]] == ["polygon:0", "polygon:0", "polygon:1"]
    assert splits["train"][-1].group is None  # an empty group: a group of its own
    carved = training_rows(aid_root, tmp_path / "grouped.csv", 0.3, seed=0)
    forest_val = {s.group for s in carved.val if s.label == 0}
    assert forest_val and not forest_val & {s.group for s in carved.train}
    assert sum(s.label == 1 for s in carved.val) == 2  # River's 6 ungrouped rows: per row, 30 %
    given = _write_csv(tmp_path / "with_val.csv", rows[:1] + [r[:3] + ("",) for r in rows[1:12]]
                       + [("Forest/forest_30.jpg", "Forest", "val", ""), ("River/river_30.jpg", "River", "val", "")])
    with_val = training_rows(aid_root, given, 0.3, seed=0)
    assert [s.path.name for s in with_val.val] == ["forest_30.jpg", "river_30.jpg"]
    assert len(with_val.train) == 11
