"""Everything decided about one raster before any tile is read: opening it, choosing its
bands, the tile grid, resampling, nodata handling and GDAL's cache size (a :class:`RasterPlan`).

Nodata: a pixel is nodata when every selected band equals its nodata value (or is NaN), or
when the raster's mask/alpha says so. The fraction is measured on the resampled tile; tiles
whose fraction exceeds ``TilingConfig.nodata_threshold`` are skipped by the pipeline.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError

from casd_core.errors import CasdError, param
from casd_core.inference.padding import PaddingMask, detect_padding, padding_values
from casd_core.inference.radiometry import (SAMPLE_PIXELS, RadiometryConfig, ValueMapping,
                                            choose_mapping)
from casd_core.package import ModelPackage
from casd_core.tiling import TileGrid, TilingConfig, tile_grid

# GDAL block cache: enough for the block rows one row of tiles spans, within these bounds.
_CACHE_MIN, _CACHE_MAX = 16 << 20, 256 << 20
# Rasters up to this many pixels are checked for being all nodata before any tile is read.
_EARLY_NODATA_CHECK_PIXELS = 2048 * 2048


@dataclass
class RasterPlan:
    """Everything decided (and validated) about one raster before any tile is read."""

    path: Path
    grid: TileGrid
    bands: tuple[int, ...]
    out_shape: tuple[int, int]
    resampling: Resampling
    mask_mode: str  # "none" | "nodata" | "mask"
    nodata: tuple[float | None, ...]
    fill: np.ndarray  # raw value written into nodata pixels, per band
    dtype: str
    crs: Any
    cache_bytes: int
    nodata_threshold: float
    mapping: ValueMapping | None = None  # raw values → the model's value range (radiometry.py)
    padding: PaddingMask | None = None  # border padding treated as nodata (padding.py)

    @property
    def name(self) -> str:
        return self.path.name


def open_raster(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    """Open a raster for reading, or raise a one-sentence :class:`CasdError`."""
    path = Path(path)
    # GDAL dataset names ("/vsizip/...", "GPKG:file.gpkg:table") are not files: let GDAL judge.
    gdal_name = str(path).startswith("/vsi") or re.match(r"^[A-Za-z][A-Za-z0-9_]+:", str(path))
    if not path.exists() and not gdal_name:
        raise CasdError(f"raster {path} does not exist; check the path")
    if path.is_dir():
        raise CasdError(f"{path} is a folder, not a raster; classify a folder of rasters instead")
    try:
        dataset = rasterio.open(path)
    except (RasterioIOError, OSError) as exc:
        reason = str(exc).split("\n")[0]
        raise CasdError(f"{path.name} is not a raster GDAL can read ({reason}); pass a "
                        "GeoTIFF or another georeferenced raster") from None
    if dataset.count == 0 or dataset.width == 0 or dataset.height == 0:
        dataset.close()
        raise CasdError(f"{path.name} has no raster bands; pass a GeoTIFF or another "
                        "georeferenced raster")
    return dataset


def select_bands(dataset: Any, package: ModelPackage, requested: tuple[int, ...] | None,
                 name: str) -> tuple[int, ...]:
    """The raster band numbers (1-based) to feed the model, in the model's band order.

    Explicit ``requested`` bands win; otherwise bands whose colour interpretation or
    description names the package's bands (red, green, blue, nir, ...), else the first
    ``len(package.bands)`` bands (so an R,G,B,NIR NAIP tile feeds R,G,B to an RGB model).
    """
    need = package.in_channels
    wanted = ", ".join(package.bands)
    if requested:
        if len(requested) != need:
            raise CasdError(f"{param('bands')} lists {len(requested)} band(s) but the model "
                            f"expects {need} ({wanted}); give {need} band numbers, e.g. "
                            f"{','.join(str(i + 1) for i in range(need))}")
        missing = [b for b in requested if b > dataset.count]
        if missing:
            raise CasdError(f"band {missing[0]} does not exist: {name} has {dataset.count} "
                            f"band(s); pick {param('bands')} between 1 and {dataset.count}")
        return tuple(int(b) for b in requested)
    if dataset.count < need:
        raise CasdError(f"the model expects {need} bands ({wanted}) but {name} has "
                        f"{dataset.count}; use a raster with those bands or a model trained "
                        f"on {dataset.count} band(s)")
    labels = []
    for i in range(dataset.count):
        interp = dataset.colorinterp[i].name.lower() if dataset.colorinterp else ""
        desc = (dataset.descriptions[i] or "").strip().lower()
        labels.append({interp, desc} - {"", "undefined", "gray", "grey"})
    by_name = []
    for band in package.bands:
        hits = [i + 1 for i, lab in enumerate(labels) if band.lower() in lab]
        if len(hits) != 1:
            break
        by_name.append(hits[0])
    if len(by_name) == need and len(set(by_name)) == need:
        return tuple(by_name)
    return tuple(range(1, need + 1))


def plan_raster(raster: str | os.PathLike, package: ModelPackage, tiling: TilingConfig,
                radiometry: RadiometryConfig | None = None) -> RasterPlan:
    """Validate a raster against a package and tiling; raise one clear CasdError if unfit.
    Decides, from one decimated read, the value mapping and the padding mask."""
    tiling.validate()
    radiometry = radiometry or RadiometryConfig()
    radiometry.validate()
    path = Path(raster)
    with open_raster(path) as dataset:
        name = path.name
        dtype = dataset.dtypes[0]
        if np.dtype(dtype).kind == "c":
            raise CasdError(f"{name} holds complex numbers; convert it to real-valued bands first")
        bands = select_bands(dataset, package, tiling.bands, name)
        grid = tile_grid(dataset, tiling, package)
        tile_h, tile_w = grid.tile_shape
        out_shape = _model_shape(package, grid)
        if (tile_h, tile_w) == out_shape:
            resampling = Resampling.nearest  # no resampling happens
        elif tile_h * tile_w > out_shape[0] * out_shape[1]:
            resampling = Resampling.average
        else:
            resampling = Resampling.bilinear
        flags = [dataset.mask_flag_enums[b - 1] for b in bands]
        nodata = tuple(dataset.nodatavals[b - 1] for b in bands)
        if all(rasterio.enums.MaskFlags.all_valid in f for f in flags):
            mask_mode = "none"
        elif all(rasterio.enums.MaskFlags.nodata in f for f in flags):
            mask_mode = "nodata"
        else:
            mask_mode = "mask"
        if radiometry.nodata is not None:
            mask_mode, nodata = "nodata", (float(radiometry.nodata),) * len(bands)
        block_h = dataset.block_shapes[0][0] if dataset.block_shapes else 256
        span = int(grid.region.width) * (tile_h + 2 * block_h) * dataset.count \
            * np.dtype(dtype).itemsize
        plan = RasterPlan(path=path, grid=grid, bands=bands, out_shape=out_shape,
                          resampling=resampling, mask_mode=mask_mode, nodata=nodata,
                          fill=np.zeros(len(bands), dtype=dtype), dtype=dtype, crs=dataset.crs,
                          cache_bytes=int(min(max(span, _CACHE_MIN), _CACHE_MAX)),
                          nodata_threshold=tiling.nodata_threshold)
        _plan_values(dataset, plan, package, radiometry)
        if _region_all_nodata(dataset, plan):
            raise CasdError(f"{name} holds only nodata in the area to classify; check its "
                            "nodata value or the extent/AOI")
    return plan


def _plan_values(dataset: Any, plan: RasterPlan, package: ModelPackage,
                 radiometry: RadiometryConfig) -> None:
    """Padding, value mapping and nodata fill of ``plan``, from one decimated read."""
    step = max(1.0, math.sqrt(dataset.width * dataset.height / SAMPLE_PIXELS))
    shape = (max(1, round(dataset.height / step)), max(1, round(dataset.width / step)))
    # Without overviews, a JPEG-compressed GeoTIFF (the usual orthophoto) is decoded in full
    # to be sampled, which costs as much as classifying it on int8 (docs/BENCHMARKS.md). GDAL's
    # implicit JPEG overviews (DCT-scaled decoding: 8x8 block means) give the padding and auto
    # decisions the same picture ~5x cheaper; explicit stretches keep exact pixel values.
    implicit = radiometry.value_range is None and radiometry.stretch in ("auto", "none")
    with rasterio.Env(GTIFF_IMPLICIT_JPEG_OVR=implicit):
        data = dataset.read(plan.bands, out_shape=(len(plan.bands), *shape), resampling=Resampling.nearest)
    masks = (dataset.read_masks(plan.bands[0], out_shape=shape, resampling=Resampling.nearest)
             if plan.mask_mode == "mask" else None)
    invalid = nodata_mask(data, plan, masks)
    if plan.mask_mode == "none" and radiometry.auto_nodata:
        plan.padding = detect_padding(data, (dataset.height, dataset.width), padding_values(plan.dtype))
        if plan.padding is not None:
            invalid |= plan.padding.mask
    plan.mapping = choose_mapping(data[:, ~invalid].astype(np.float64), package, radiometry)
    # Nodata pixels are filled with what becomes the band mean (0 after normalisation).
    fill = np.array([m * package.value_scale for m in package.mean], dtype=np.float64)
    if plan.mapping is not None:
        fill = plan.mapping.inverse(fill)
    if np.dtype(plan.dtype).kind in "ui":
        info = np.iinfo(plan.dtype)
        fill = np.clip(np.round(fill), info.min, info.max)
    plan.fill = fill.astype(plan.dtype)


def _model_shape(package: ModelPackage, grid: TileGrid) -> tuple[int, int]:
    """Pixels the model sees per tile: its input size, or, when the package knows its ground
    sample distance, the tile resampled to that GSD (within 1/4..4× the input size, so an
    odd tile size cannot make batches explode)."""
    size = package.input_size
    if package.gsd_m and grid.ground_size_m is not None:
        lo, hi = max(8, size // 4), size * 4
        width = min(max(round(grid.ground_size_m[0] / package.gsd_m), lo), hi)
        height = min(max(round(grid.ground_size_m[1] / package.gsd_m), lo), hi)
        return height, width
    return size, size


def _region_all_nodata(dataset: Any, plan: RasterPlan) -> bool:
    """Exact all-nodata test on small regions (bigger ones are caught after the last tile)."""
    region = plan.grid.region
    if plan.mask_mode == "none" or region.width * region.height > _EARLY_NODATA_CHECK_PIXELS:
        return False
    data = dataset.read(plan.bands, window=region)
    masks = dataset.read_masks(plan.bands[0], window=region) if plan.mask_mode == "mask" else None
    return bool(nodata_mask(data, plan, masks).all())


def nodata_mask(data: np.ndarray, plan: RasterPlan, mask: np.ndarray | None) -> np.ndarray:
    """(…, H, W) boolean: pixel is nodata in every selected band, or masked out."""
    band_axis = data.ndim - 3
    if mask is not None:
        invalid = mask == 0
    elif plan.mask_mode == "nodata":
        per_band = []
        for k, value in enumerate(plan.nodata):
            band = np.take(data, k, axis=band_axis)
            if value is None:
                per_band.append(np.zeros(band.shape, dtype=bool))
            elif isinstance(value, float) and math.isnan(value):
                per_band.append(np.isnan(band))
            else:
                per_band.append(band == np.asarray(value).astype(data.dtype))
        invalid = np.logical_and.reduce(per_band)
    else:
        invalid = np.zeros(np.take(data, 0, axis=band_axis).shape, dtype=bool)
    if data.dtype.kind == "f":
        invalid |= ~np.isfinite(data).all(axis=band_axis)
    return invalid

