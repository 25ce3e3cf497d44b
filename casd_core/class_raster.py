"""The labelled grid as a small class raster: one pixel per tile, for raster tools and overlays.

Pixel (row, col) holds the class id of the tile with those grid ``row``/``col`` fields; the
geotransform puts the origin at the processed region's top-left corner and makes a pixel one
grid *stride* wide (the step between consecutive windows; the tile size for a grid with a
single row/column). With overlap a pixel is therefore smaller than its tile and lies at the
tile's top-left. A shifted last column/row (:attr:`TileGrid.edge_shifted`) still gets its own
index, so the raster's last column/row may reach past the raster's edge by less than a stride.

Band 1 is ``uint8`` (``uint16`` past 255 classes), nodata 255 (65535) for grid cells without a
label (skipped as nodata, outside the AOI, or ``uncertain``), with the package's colours as a
GDAL colour table. Class names go where QGIS and GDAL read them: the band's category names
(``<name>.aux.xml``, shown by ``gdalinfo`` and used by QGIS for the colour table's labels) and a
``<stem>.qml`` paletted style listing only the classes present (QGIS loads it as the default
style; without it QGIS would list all 256 colour-table entries of a GeoTIFF).

A GeoTIFF holds one data type for all its bands, so ``probabilities=True`` writes the float32
bands ``score``, ``margin``, ``entropy`` (nodata NaN) to a companion ``<stem>_confidence.tif``
(:func:`confidence_path`) instead of adding them to the paletted class raster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio
import shapely
from affine import Affine

from casd_core.atomic import atomic_output, write_text_atomic
from casd_core.errors import CasdError
from casd_core.package import ModelPackage
from casd_core.tiling import TileGrid
from casd_core.vectorio import read_layer

UNCERTAIN = "uncertain"
CONFIDENCE_BANDS = ("score", "margin", "entropy")
_BLOCK = 256


def confidence_path(path: str | os.PathLike) -> Path:
    """Where ``probabilities=True`` writes the score/margin/entropy bands for ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_confidence{path.suffix}")


def grid_transform(grid: TileGrid) -> Affine:
    """One pixel per grid cell: origin at the region's top-left, pixel = the grid stride."""
    t = grid.transform
    tile_h, tile_w = grid.tile_shape
    step_x = int(grid.col_offsets[1] - grid.col_offsets[0]) if len(grid.col_offsets) > 1 else tile_w
    step_y = int(grid.row_offsets[1] - grid.row_offsets[0]) if len(grid.row_offsets) > 1 else tile_h
    origin = t * (int(grid.region.col_off), int(grid.region.row_off))
    return Affine(t.a * step_x, t.b * step_y, origin[0], t.d * step_x, t.e * step_y, origin[1])


def write_class_raster(layer: str | os.PathLike, grid: TileGrid, path: str | os.PathLike,
                       package: ModelPackage | str | os.PathLike, *,
                       probabilities: bool = False) -> Path:
    """Write the tile layer ``layer`` (from ``casd predict``, not dissolved) as a class-id
    GeoTIFF at ``path`` (atomically, with its ``.aux.xml`` and ``.qml``); returns ``path``.

    ``grid`` is the grid the layer was made on: ``tile_grid(raster, tiling, package)`` with
    the tiling given to ``casd predict``; a layer of another grid is refused (CasdError).
    """
    if isinstance(package, (str, os.PathLike)):
        package = ModelPackage.load(package)
    path = Path(path)
    wanted = ["class_id", "class_name", "row", "col", *(CONFIDENCE_BANDS if probabilities else ())]
    geometry, fields, _ = read_layer(layer, wanted, optional=("model",),
                                     hint=" (a dissolved layer has no grid cells: write the tile layer)")
    rows, cols = _cells(layer, geometry, fields, grid)
    ids = np.asarray(fields["class_id"], dtype=float)
    labelled = np.isfinite(ids) & np.array([n != UNCERTAIN for n in fields["class_name"]])
    _check_classes(ids[labelled].astype(np.int64), fields["class_name"][labelled], package, layer)

    dtype, nodata = ("uint8", 255) if package.num_classes <= 255 else ("uint16", 65535)
    classes = np.full(grid.shape, nodata, dtype=dtype)
    classes[rows[labelled], cols[labelled]] = ids[labelled].astype(dtype)
    profile = _profile(grid, dtype, nodata, count=1)
    models = sorted({m for m in fields.get("model", []) if isinstance(m, str) and m})

    if probabilities:
        values = np.full((3, *grid.shape), np.nan, dtype=np.float32)
        for band, name in enumerate(CONFIDENCE_BANDS):
            values[band, rows[labelled], cols[labelled]] = np.asarray(fields[name], float)[labelled]
        with atomic_output(confidence_path(path)) as tmp:
            with rasterio.open(tmp, "w", **_profile(grid, "float32", float("nan"), count=3)) as dst:
                dst.write(values)
                for band, name in enumerate(CONFIDENCE_BANDS, start=1):
                    dst.set_band_description(band, name)
            _drop_aux(tmp)

    present = sorted(int(v) for v in np.unique(classes) if v != nodata)
    sidecars = {Path(f"{path}.aux.xml"): _aux_xml(package),
                path.with_suffix(".qml"): _qml(package, present)}
    new = [p for p in sidecars if not p.exists()]
    try:
        with atomic_output(path) as tmp:
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(classes, 1)
                dst.set_band_description(1, "class_id")
                dst.write_colormap(1, {i: (*_rgb(c), 255) for i, c in enumerate(package.class_colors)})
                dst.update_tags(casd_model=",".join(models) or package.backbone,
                                casd_cell="one pixel per tile of the grid")
            _drop_aux(tmp)
            for sidecar, text in sidecars.items():  # first, so the raster never lacks them
                write_text_atomic(text, sidecar)
    except BaseException:
        for sidecar in new:
            sidecar.unlink(missing_ok=True)
        raise
    return path


def _cells(layer: Any, geometry: np.ndarray, fields: dict, grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """Grid (row, col) of every feature, checked against the grid: a layer made with another
    tiling (tile size, stride, extent) is refused instead of being written to the wrong cells."""
    rows, cols = np.asarray(fields["row"], np.int64), np.asarray(fields["col"], np.int64)
    n_rows, n_cols = grid.shape
    mismatch = f"layer {Path(layer).name} was not made on this tile grid; recompute the grid " \
               "with the tiling used for casd predict"
    if len(rows) and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n_rows or cols.max() >= n_cols):
        raise CasdError(f"{mismatch} (a tile lies outside its {n_rows}×{n_cols} cells)")
    if len(rows):
        t = grid.transform
        tile_h, tile_w = grid.tile_shape
        x0, y0 = t * (grid.col_offsets[cols], grid.row_offsets[rows])
        x1, y1 = t * (grid.col_offsets[cols] + tile_w, grid.row_offsets[rows] + tile_h)
        expected = np.column_stack([np.minimum(x0, x1), np.minimum(y0, y1),
                                    np.maximum(x0, x1), np.maximum(y0, y1)])
        error = np.abs(shapely.bounds(shapely.from_wkb(geometry)) - expected).max()
        if not error <= 0.5 * max(abs(t.a), abs(t.e)):
            raise CasdError(f"{mismatch} (tiles are up to {error:g} map units from their cells)")
    return rows, cols


def _check_classes(ids: np.ndarray, names: np.ndarray, package: ModelPackage, layer: Any) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= package.num_classes
                     or any(package.class_names[i] != n for i, n in zip(ids, names))):
        raise CasdError(f"the classes of layer {Path(layer).name} are not those of this model "
                        "package; pass the package it was classified with")


def _profile(grid: TileGrid, dtype: str, nodata: float, count: int) -> dict[str, Any]:
    n_rows, n_cols = grid.shape
    profile = dict(driver="GTiff", width=n_cols, height=n_rows, count=count, dtype=dtype,
                   nodata=nodata, crs=grid.crs, transform=grid_transform(grid), compress="deflate")
    if n_rows > _BLOCK or n_cols > _BLOCK:
        profile.update(tiled=True, blockxsize=_BLOCK, blockysize=_BLOCK)
    return profile


def _drop_aux(tmp: Path) -> None:
    Path(f"{tmp}.aux.xml").unlink(missing_ok=True)  # GDAL's own, if any: ours replaces it


def _aux_xml(package: ModelPackage) -> str:
    """GDAL's PAM sidecar: band 1's category names (index = class id)."""
    names = "\n".join(f"      <Category>{escape(n)}</Category>" for n in package.class_names)
    return (f"<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n{names}\n"
            "    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")


def _qml(package: ModelPackage, present: list[int]) -> str:
    """A QGIS paletted style listing the classes present, in class-id order."""
    entries = "\n".join(
        f'      <paletteEntry value="{i}" color="{package.class_colors[i]}" alpha="255" '
        f"label={quoteattr(package.class_names[i])}/>" for i in present)
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis styleCategories="Symbology" version="3.22.0">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast gamma="1" contrast="0" brightness="0"/>
    <huesaturation colorizeOn="0" saturation="0" grayscaleMode="0" invertColors="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def _rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    try:
        return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return (128, 128, 128)
