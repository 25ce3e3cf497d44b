"""Helpers shared by the tests: a small test model package, rasters derived from the real ones
for cases a real file cannot show, a small AID split, and a script run in a fresh headless QGIS."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import rasterio
import torch
from rasterio.windows import Window

from casd_core.package import ModelPackage, default_class_colors

AID_CLASSES = ("Airport BareLand BaseballField Beach Bridge Center Church Commercial "
               "DenseResidential Desert Farmland Forest Industrial Meadow MediumResidential "
               "Mountain Park Parking Playground Pond Port RailwayStation Resort River School "
               "SparseResidential Square Stadium StorageTanks Viaduct").split()
NAIP = "m_4709963_se_14_1_20200831.tif"
# Small inputs keep the random-weight EfficientNet-Lite0 fast on 2 shared cores.
TEST_INPUT_SIZE = 64


def build_test_package(path: Path, input_size: int = TEST_INPUT_SIZE) -> Path:
    """An AID-style package (30 classes, RGB, 120 m tiles): ImageNet trunk (shipped offline),
    random head. A fully random EfficientNet-Lite0 gives the same output for every input."""
    from casd_core.models import build_model, default_normalization

    torch.manual_seed(0)
    mean, std = default_normalization("efficientnet_lite0", 3)
    package = ModelPackage(
        backbone="efficientnet_lite0", class_names=list(AID_CLASSES),
        class_colors=default_class_colors(list(AID_CLASSES)), bands=["red", "green", "blue"],
        input_size=input_size, mean=mean, std=std, tile_footprint_m=120.0,
        state_dict=build_model("efficientnet_lite0", len(AID_CLASSES), pretrained="imagenet").state_dict())
    return package.save(path)


def derive_raster(source: Path, out: Path, *, window: Window | None = None, bands=None,
                  edit=None, **profile_changes) -> Path:
    """A GeoTIFF made from a real raster: cropped, band-selected, edited, re-described."""
    with rasterio.open(source) as src:
        window = window or Window(0, 0, src.width, src.height)
        bands = bands or list(range(1, src.count + 1))
        data = src.read(bands, window=window)
        profile = src.profile | {"width": int(window.width), "height": int(window.height),
                                 "count": len(bands), "transform": src.window_transform(window),
                                 "compress": "deflate", "photometric": "minisblack",
                                 "tiled": True, "blockxsize": 256, "blockysize": 256}
    profile.update(profile_changes)
    if edit is not None:
        data = edit(data)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def small_split(aid_root: Path, out: Path, train_per_class: int, test_per_class: int) -> Path:
    """A path,label,split CSV with the first rows of each class of AID's split_20.csv."""
    with (aid_root / "split_20.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    taken: dict[tuple[str, str], int] = {}
    keep = []
    for row in rows:
        key = (row["label"], row["split"])
        if taken.get(key, 0) < (train_per_class if row["split"] == "train" else test_per_class):
            taken[key] = taken.get(key, 0) + 1
            keep.append(row)
    path = out / "small_split.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(keep)
    return path


def run_qgis_script(script: str, tmp_path: Path, python: Path | None = None) -> list[dict]:
    """Run ``script`` in a fresh headless QGIS process (its own settings under ``tmp_path``), with
    ``python`` (default: this interpreter), and return the JSON objects it printed on lines
    starting with ``RESULT``."""
    env = os.environ | {"QT_QPA_PLATFORM": "offscreen", "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgis"),
                        "XDG_RUNTIME_DIR": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    (tmp_path / "xdg").mkdir(mode=0o700, exist_ok=True)
    done = subprocess.run([str(python or sys.executable), "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, done.stderr[-2000:]
    return [json.loads(line[len("RESULT"):]) for line in lines]


def plugin_script(tmp_path: Path, body: str) -> str:
    """A headless-QGIS script for :func:`run_qgis_script`: QGIS and Processing started, this
    repository loaded as the plugin ``casd_scene_classifier`` (``plugin``, its provider
    registered), then ``body`` (dedented), then QGIS closed."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    link = plugins / "casd_scene_classifier"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
    prelude = textwrap.dedent(f"""\
        import gc, json, os, sys
        from qgis.core import QgsApplication
        app = QgsApplication([], False)
        app.initQgis()
        sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))
        from processing.core.Processing import Processing
        Processing.initialize()
        import processing
        sys.path.insert(0, {str(plugins)!r})
        import casd_scene_classifier
        plugin = casd_scene_classifier.classFactory(None)
        plugin.initProcessing()
    """)
    return prelude + textwrap.dedent(body) + "gc.collect()\napp.exitQgis()\n"
