"""Scene datasets: class-folder trees and split CSVs, image decoding, augmentation.

Images may be JPEG/PNG (read with Pillow) or (multi-band) GeoTIFF chips (read with
rasterio). Pixels become float tensors in [0, 1] by dividing by an explicit value scale:
255 for uint8; for uint16 imagery the scale must be given (10000 for reflectance products,
65535 for full-range data), because guessing it silently changes what the model sees.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image
from torchvision.transforms import v2

from casd_core.errors import CasdError, param

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
_TIFF_SUFFIXES = {".tif", ".tiff"}


SPLITS = ("train", "test", "val")


@dataclass(frozen=True)
class Sample:
    """One labelled image: its path, the index of its class and its spatial group (the
    ``group`` column of a ``casd chips`` split: a polygon group or block; ``None`` without)."""

    path: Path
    label: int
    group: str | None = None


def default_data_root() -> Path:
    """``$CASD_DATA`` or ``../shared/data`` beside the repository: the one configurable path."""
    return Path(os.environ.get("CASD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def scan_class_folders(root: Path) -> tuple[list[Sample], list[str]]:
    """All images under ``root/<class>/``, classes sorted by name (ImageFolder layout)."""
    root = Path(root)
    if not root.is_dir():
        raise CasdError(f"{param('data_root')} {root} does not exist; pass a folder with one "
                        "sub-folder per class")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [
        Sample(path, label)
        for label, name in enumerate(class_names)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise CasdError(f"no images (.jpg/.png/.tif) found in class sub-folders of {root}")
    return samples, class_names


def read_split(split_csv: Path, data_root: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    """Samples per split from a ``path,label,split`` CSV (``path`` relative to ``data_root``),
    with an optional ``group`` column (``casd chips`` writes one) kept on each sample.

    ``split`` is ``train``, ``test`` or ``val``; any other value is refused with the row's
    line number rather than silently left out. Class indices follow the sorted class names of
    the whole file, so every split and every model trained on the file agree on them.
    """
    split_csv, data_root = Path(split_csv), Path(data_root)
    if not split_csv.is_file():
        raise CasdError(f"{param('split_csv')} {split_csv} does not exist; pass a CSV with columns "
                        "path,label,split")
    with split_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label", "split"} <= set(rows[0]):
        raise CasdError(f"{split_csv} must be a CSV with the columns path,label,split")
    for line, row in enumerate(rows, start=2):
        if row["split"] not in SPLITS:
            raise CasdError(f"{split_csv} line {line}: split {row['split']!r} is not one of "
                            f"{', '.join(SPLITS)}; fix the {param('split_csv')}")
    class_names = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, list[Sample]] = defaultdict(list)
    for row in rows:
        splits[row["split"]].append(Sample(data_root / row["path"], index[row["label"]], row.get("group") or None))
    missing = [s.path for s in splits.get("train", [])[:1] + splits.get("test", [])[:1] if not s.path.is_file()]
    if missing:
        raise CasdError(f"{missing[0]} listed in {split_csv} does not exist; is {param('data_root')} "
                        "the folder the CSV paths are relative to?")
    return dict(splits), class_names


def stratified_validation_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) with ``fraction`` of every class held out, seeded.

    Every class keeps at least one training image and, when it has two or more, gives at
    least one to validation, so per-class validation accuracy is always defined.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    train, val = [], []
    for label in sorted(by_class):
        members = rng.permutation(by_class[label]).tolist()
        n_val = 0 if len(members) < 2 or fraction <= 0 else min(len(members) - 1, max(1, round(fraction * len(members))))
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def subset_per_class(samples: Sequence[Sample], per_class: int, seed: int) -> list[Sample]:
    """A seeded, stratified subset with at most ``per_class`` images of each class."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_class[sample.label].append(i)
    keep = sorted(i for members in by_class.values() for i in rng.permutation(members)[:per_class].tolist())
    return [samples[i] for i in keep]


@dataclass(frozen=True)
class TrainingRows:
    """The rows of one training run: ``train`` (what the weights saw), ``val`` (carved from
    the ``train`` rows, or the CSV's ``val`` rows; for model selection and calibration) and
    ``test`` (held out)."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    class_names: list[str]


def training_rows(data_root: Path, split_csv: Path | None, val_fraction: float, seed: int,
                  per_class: int | None = None) -> TrainingRows:
    """The train/validation/test rows a run with these settings uses (the one definition,
    shared by training and ``casd calibrate``, so both carve the very same validation rows).

    With a split CSV its ``train`` rows are the pool and its ``test`` rows the test set;
    without, every image under ``data_root/<class>/`` is the pool and there is no test set.
    ``per_class`` caps both (quick runs). Validation is the CSV's ``val`` rows when it has
    any; else it is carved from the pool, ``val_fraction`` of each class drawn with ``seed``:
    per image (:func:`stratified_validation_split`), or, when the rows have a spatial ``group``
    (``casd chips``' split), whole groups (:func:`casd_core.chips.group_split`), so that
    neighbouring chips are never on both sides; a row without a group is a group of its own.
    """
    given_val: list[Sample] = []
    if split_csv is not None:
        splits, class_names = read_split(split_csv, data_root)
        if "train" not in splits:
            raise CasdError(f"{split_csv} has no 'train' rows")
        pool, test, given_val = splits["train"], splits.get("test", []), splits.get("val", [])
    else:
        pool, class_names = scan_class_folders(data_root)
        test = []
    if per_class:
        pool, test = subset_per_class(pool, per_class, seed), subset_per_class(test, per_class, seed)
        given_val = subset_per_class(given_val, per_class, seed)
    if given_val:
        return TrainingRows(list(pool), list(given_val), list(test), class_names)
    labels = [s.label for s in pool]
    if any(s.group is not None for s in pool):
        from casd_core.chips.split import group_split

        groups = [s.group if s.group is not None else f"row:{i}" for i, s in enumerate(pool)]
        train_idx, val_idx = group_split(labels, groups, val_fraction, seed)
    else:
        train_idx, val_idx = stratified_validation_split(labels, val_fraction, seed)
    return TrainingRows([pool[i] for i in train_idx], [pool[i] for i in val_idx], list(test), class_names)


def read_raw(path: Path, bands: Sequence[int] | None = None) -> torch.Tensor:
    """An image's pixels as stored, ``(C, H, W)`` (uint8 for photos; ``bands`` 1-based, TIFF only)."""
    path = Path(path)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import rasterio

        with rasterio.open(path) as src:
            array = src.read(list(bands) if bands else None)
        return torch.from_numpy(array)
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def read_image(path: Path, bands: Sequence[int] | None = None, value_scale: float | None = None) -> torch.Tensor:
    """An image as a float ``(C, H, W)`` tensor in [0, 1] (``bands`` are 1-based, TIFF only)."""
    return to_unit_range(read_raw(path, bands), value_scale, path)


PIXEL_PERCENTILES = (0.5, 99.5)


def pixel_statistics(source: "SceneDataset | Sequence[Sample | str | os.PathLike]",
                     bands: Sequence[int] | None = None, max_images: int = 500, step: int = 3,
                     seed: int = 0, percentiles: Sequence[float] = PIXEL_PERCENTILES) -> dict[str, list[float]]:
    """Per-band statistics of training pixels in raw units (before the value scale): the
    :attr:`~casd_core.package.ModelPackage.pixel_stats` of a package.

    Reads up to ``max_images`` images drawn with ``seed`` (all of them when there are fewer)
    and every ``step``-th pixel of every ``step``-th row of each, exactly as training reads
    them (:func:`read_raw`, same ``bands``; a :class:`SceneDataset` brings its own), so it
    costs a fraction of a second for 500 AID images. Returns ``percentiles`` (the two levels),
    ``low``/``high`` (those percentiles), ``mean`` and ``std``, one value per band.
    """
    if isinstance(source, SceneDataset):
        bands = source.bands if bands is None else bands
        source = source.samples
    paths = [Path(item.path if isinstance(item, Sample) else item) for item in source]
    if not paths:
        raise CasdError("no images to compute pixel statistics from")
    if len(paths) > max_images:
        chosen = np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False)
        paths = [paths[i] for i in sorted(chosen.tolist())]
    step = max(1, int(step))
    chunks = []
    for path in paths:  # a copy of the subsample only: large chips do not pile up in memory
        raw = read_raw(path, bands)[:, ::step, ::step]
        chunks.append(raw.reshape(raw.shape[0], -1).numpy().astype(np.float64))
        if chunks[-1].shape[0] != chunks[0].shape[0]:
            raise CasdError(f"{path} has {chunks[-1].shape[0]} bands, {paths[0]} {chunks[0].shape[0]}; "
                            f"all training images must hold the same {param('bands')}")
    pixels = np.concatenate(chunks, axis=1)
    low, high = np.percentile(pixels, list(percentiles), axis=1)
    return {"percentiles": [float(p) for p in percentiles],
            "low": [float(v) for v in low], "high": [float(v) for v in high],
            "mean": [float(v) for v in pixels.mean(axis=1)], "std": [float(v) for v in pixels.std(axis=1)]}


def band_names(path: Path, bands: Sequence[int] | None = None) -> list[str]:
    """Names of the bands ``read_image`` returns: RGB for photos, GeoTIFF descriptions otherwise."""
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return ["red", "green", "blue"]
    import rasterio

    with rasterio.open(path) as src:
        indexes = list(bands) if bands else list(src.indexes)
        return [src.descriptions[i - 1] or f"band{i}" for i in indexes]


def to_unit_range(pixels: torch.Tensor | np.ndarray, value_scale: float | None, source: object = "image") -> torch.Tensor:
    """Divide raw pixel values by the value scale (255 for uint8; must be explicit otherwise)."""
    pixels = torch.as_tensor(pixels)
    if value_scale is None:
        if pixels.dtype != torch.uint8:
            raise CasdError(f"{source} holds {pixels.dtype} pixels; give the {param('value_scale')} "
                            "explicitly (e.g. 10000 for reflectance, 65535 for full-range uint16)")
        value_scale = 255.0
    return pixels.float() / value_scale  # out of place: a float32 input is the caller's buffer


class RandomRightAngleRotation(torch.nn.Module):
    """Rotate by a random multiple of 90°: overhead scenes have no canonical 'up'."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(4, ()).item())
        return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


def build_transforms(input_size: int, mean: Sequence[float], std: Sequence[float], train: bool) -> Callable:
    """Augmentation for overhead imagery (flips, 90° turns, resized crops) or eval resizing."""
    if train:
        steps = [
            v2.RandomResizedCrop(input_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRightAngleRotation(),
        ]
    else:
        steps = [v2.Resize((input_size, input_size), antialias=True)]
    return v2.Compose([*steps, v2.Normalize(list(mean), list(std))])


class SceneDataset(Dataset):
    """Labelled scene images; ``dataset[i]`` is ``(image, label)`` with ``transform`` applied."""

    def __init__(self, samples: Sequence[Sample], class_names: Sequence[str],
                 transform: Callable | None = None, bands: Sequence[int] | None = None,
                 value_scale: float | None = None) -> None:
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.bands = bands
        self.value_scale = value_scale

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = read_image(sample.path, self.bands, self.value_scale)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label


class RunData:
    """The datasets of one training run (``cfg``: a :class:`~casd_core.train.TrainConfig`):
    ``train`` (augmented; ``train_unaugmented`` as evaluation sees images), ``val`` and ``test``
    (:func:`training_rows`, drawn with ``cfg.data_seed``), their ``class_names``,
    the ``bands`` the first training image has (RGB photos, multi-band chips), the
    ``value_scale`` and the per-band ``mean``/``std``, ``normalization(number of bands)``."""

    def __init__(self, cfg: Any, normalization: Callable[[int], tuple[list[float], list[float]]]) -> None:
        rows = training_rows(cfg.data_root, cfg.split_csv, cfg.val_fraction, cfg.data_seed, cfg.subset_per_class)
        self.class_names = rows.class_names
        first = rows.train[0].path
        self.bands = band_names(first, cfg.bands)
        self.value_scale = cfg.value_scale or 255.0
        read_image(first, cfg.bands, cfg.value_scale)  # fails early on uint16 without a scale
        self.mean, self.std = normalization(len(self.bands))
        train_tf = build_transforms(cfg.input_size, self.mean, self.std, train=True)
        eval_tf = build_transforms(cfg.input_size, self.mean, self.std, train=False)

        def dataset(samples: list, transform: Any) -> SceneDataset:
            return SceneDataset(samples, self.class_names, transform, cfg.bands, cfg.value_scale)

        self.train, self.val, self.test = (dataset(rows.train, train_tf), dataset(rows.val, eval_tf),
                                           dataset(rows.test, eval_tf))
        self.train_unaugmented = dataset(rows.train, eval_tf)  # what batch-norm statistics are taken on
