"""Helpers shared by the inference, vector-output and CLI tests: a small test model package
and rasters derived from the real ones for cases a real file cannot show."""

from __future__ import annotations

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
