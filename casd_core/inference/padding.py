"""Black (or white) padding without a nodata flag: constant regions connected to the border.

Reprojected or mosaicked orthophotos often carry borders of pure 0 (or 255) in every band
with no nodata value set; fed to the model they are confidently labelled (Desert, Beach).
On a raster without a nodata flag or mask, :func:`detect_padding` finds, on the decimated read
that also samples the radiometry, the pixels whose bands are all 0 (or all at the integer
type's maximum, e.g. 255) and keeps the connected regions of them that touch the raster's
edge. A black roof inside the image is not padding; a black corner is. Each tile then treats
a pixel as nodata when it has the constant value *and* lies in such a region (the coarse mask
resampled onto the tile), so the nodata-fraction rule skips tiles that are mostly padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio.features
from affine import Affine
from rasterio.windows import Window
from shapely.geometry import shape


@dataclass(frozen=True)
class PaddingMask:
    """Where padding is, on a coarse grid over the whole raster, and the values it has."""

    mask: np.ndarray  # (h, w) bool: the cell belongs to a border-connected constant region
    cell: tuple[float, float]  # raster pixels per mask cell, (rows, columns)
    values: tuple[float, ...]

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def on_tile(self, window: Window, out_shape: tuple[int, int]) -> np.ndarray:
        """The mask resampled (nearest) onto a tile read from ``window`` into ``out_shape``."""
        rows = window.row_off + (np.arange(out_shape[0]) + 0.5) * window.height / out_shape[0]
        cols = window.col_off + (np.arange(out_shape[1]) + 0.5) * window.width / out_shape[1]
        r = np.clip((rows / self.cell[0]).astype(np.int64), 0, self.mask.shape[0] - 1)
        c = np.clip((cols / self.cell[1]).astype(np.int64), 0, self.mask.shape[1] - 1)
        return self.mask[np.ix_(r, c)]

    def pixels(self, data: np.ndarray, window: Window) -> np.ndarray:
        """(H, W) bool for a tile's (C, H, W) raw data: padding value in every band, in a padding region."""
        constant = np.zeros(data.shape[1:], dtype=bool)
        for value in self.values:
            constant |= (data == np.asarray(value, dtype=data.dtype)).all(axis=0)
        if not constant.any():
            return constant
        return constant & self.on_tile(window, data.shape[1:])


def padding_values(dtype: str) -> tuple[float, ...]:
    kind = np.dtype(dtype).kind
    if kind in "ui":
        return (0.0, float(np.iinfo(dtype).max))
    return (0.0, 255.0) if kind == "f" else (0.0,)


def detect_padding(decimated: np.ndarray, raster_shape: tuple[int, int],
                   values: tuple[float, ...]) -> PaddingMask | None:
    """The border-connected constant regions of a decimated (C, h, w) read; ``None`` if none."""
    constant = np.zeros(decimated.shape[1:], dtype=bool)
    for value in values:
        constant |= (decimated == np.asarray(value, dtype=decimated.dtype)).all(axis=0)
    if not (constant[0].any() or constant[-1].any() or constant[:, 0].any() or constant[:, -1].any()):
        return None
    height, width = constant.shape
    touching = []
    # GDAL's polygonize labels the connected regions (8-connected); keep those at the edge.
    for geometry, _ in rasterio.features.shapes(constant.astype(np.uint8), mask=constant,
                                                connectivity=8, transform=Affine.identity()):
        left, top, right, bottom = shape(geometry).bounds
        if left <= 0 or top <= 0 or right >= width or bottom >= height:
            touching.append(geometry)
    if not touching:
        return None
    mask = rasterio.features.rasterize(touching, out_shape=(height, width), transform=Affine.identity(),
                                       fill=0, default_value=1, dtype=np.uint8).astype(bool) & constant
    cell = (raster_shape[0] / height, raster_shape[1] / width)
    return PaddingMask(mask=mask, cell=cell, values=values)
