"""Windows over a raster, in pixels or metres: the tile grid and each tile's ground polygon.

The grid is a product of row offsets and column offsets (kept as two small arrays, so its
memory does not grow with the raster's area) over the *processed region*: the whole raster,
or the part of it inside ``extent`` and the AOI's bounds, snapped outward to whole pixels.

Edge policy: every tile is full-size and lies inside the raster. Windows start at the
region's top-left corner and step by the stride; when the last one would stop short of the
region's right (bottom) edge, one more window is added that is *shifted inward* so that it
ends exactly on that edge. That last column (row) therefore overlaps its neighbour; its
polygon is the ground it was really read from, so the polygons of a grid cover the processed
region exactly (their union equals it), overlapping only there and where ``overlap > 0``.
:attr:`TileGrid.edge_shifted` records whether a shifted column/row was added.

Tile sizes in metres are turned into whole pixels with the raster's pixel size: the nominal
one for projected CRSs (scaled by the CRS's linear unit, so US feet work too) and, for
geographic CRSs in degrees, the ground size of one pixel at the raster's centre measured in
a local azimuthal-equidistant projection (so a 120 m tile is 120 m on the ground at the
centre and within the usual scale error of a degree grid elsewhere).

Reads follow the grid row by row, left to right, so consecutive windows share the GeoTIFF's
internal blocks; the inference pipeline sizes GDAL's block cache to hold the block rows one
row of tiles spans, so each block is decoded about once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from casd_core.errors import CasdError, param

UNITS = ("m", "px")


@dataclass
class TilingConfig:
    """How to cut a raster into tiles.

    ``tile_size`` and ``stride`` are in ``unit`` ("m": metres on the ground, "px": raster
    pixels); ``tile_size=None`` takes the model package's recommended ground footprint
    (``tile_footprint_m``, else ``input_size * gsd_m`` metres, else ``input_size`` pixels).
    ``stride`` overrides ``overlap`` (a fraction of the tile in [0, 1)). Tiles whose nodata
    fraction exceeds ``nodata_threshold`` get no label. ``bands`` are 1-based raster band
    numbers in the model's band order. ``extent`` (xmin, ymin, xmax, ymax) is in the
    raster's CRS; ``aoi`` (a shapely geometry) too, unless ``aoi_crs`` (anything
    ``rasterio.crs.CRS.from_user_input`` takes) says otherwise: it is then reprojected to each
    raster's CRS. With an AOI only tiles that share area with it are kept.
    """

    tile_size: float | None = None
    unit: str = "m"
    overlap: float = 0.0
    stride: float | None = None
    nodata_threshold: float = 0.5
    bands: tuple[int, ...] | None = None
    extent: tuple[float, float, float, float] | None = None
    aoi: BaseGeometry | None = None
    aoi_crs: Any = None

    def validate(self) -> None:
        """Raise :class:`CasdError` for a setting that cannot mean anything."""
        if self.unit not in UNITS:
            raise CasdError(f"{param('unit')} {self.unit!r} is not one of {', '.join(UNITS)}; "
                            "use 'm' for metres or 'px' for pixels")
        if self.tile_size is not None and not (self.tile_size > 0 and math.isfinite(self.tile_size)):
            raise CasdError(f"{param('tile_size')} {self.tile_size} must be a positive number")
        if self.stride is not None and not (self.stride > 0 and math.isfinite(self.stride)):
            raise CasdError(f"{param('stride')} {self.stride} must be a positive number")
        if not 0.0 <= self.overlap < 1.0:
            raise CasdError(f"{param('overlap')} {self.overlap} must be a fraction in [0, 1), e.g. 0.25")
        if not 0.0 <= self.nodata_threshold <= 1.0:
            raise CasdError(f"{param('nodata_threshold')} {self.nodata_threshold} must be a fraction "
                            "in [0, 1]")
        if self.bands is not None:
            if len(self.bands) == 0 or any(int(b) != b or b < 1 for b in self.bands):
                raise CasdError(f"{param('bands')} {self.bands} must be 1-based band numbers, e.g. 1,2,3")
        if self.extent is not None:
            if len(self.extent) != 4:
                raise CasdError(f"{param('extent')} must be four numbers: xmin ymin xmax ymax")
            xmin, ymin, xmax, ymax = self.extent
            if not (xmin < xmax and ymin < ymax):
                raise CasdError(f"{param('extent')} {tuple(self.extent)} is empty; give xmin ymin "
                                "xmax ymax with xmin < xmax and ymin < ymax")
        if self.aoi is not None:
            if not isinstance(self.aoi, BaseGeometry) or self.aoi.is_empty:
                raise CasdError(f"the {param('aoi')} is empty or not a geometry; pass a polygon layer")
            if self.aoi.area <= 0:
                raise CasdError(f"the {param('aoi')} has no area; pass a polygon layer")


@dataclass(frozen=True)
class Tile:
    """One window of the grid: its grid position, pixel window and ground polygon."""

    row: int
    col: int
    window: Window
    polygon: Polygon


@dataclass
class TileGrid:
    """Tiles over a raster's processed region, iterated row by row (see the module doc).

    ``row_offsets``/``col_offsets`` are pixel offsets of the windows' top-left corners in the
    raster; ``tile_shape`` is (height, width) in pixels; ``ground_size_m`` the tile's
    (width, height) on the ground in metres, ``None`` when the CRS has no known unit.
    """

    transform: Affine
    crs: Any
    tile_shape: tuple[int, int]
    row_offsets: np.ndarray
    col_offsets: np.ndarray
    region: Window
    ground_size_m: tuple[float, float] | None = None
    edge_shifted: tuple[bool, bool] = (False, False)
    aoi: BaseGeometry | None = None
    _count: int | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the full grid, before the AOI filter."""
        return len(self.row_offsets), len(self.col_offsets)

    def window(self, row: int, col: int) -> Window:
        height, width = self.tile_shape
        return Window(int(self.col_offsets[col]), int(self.row_offsets[row]), width, height)

    def polygon(self, window: Window) -> Polygon:
        """The ground footprint of a pixel window, in the raster's CRS."""
        return window_polygon(self.transform, window)

    def tile(self, row: int, col: int) -> Tile:
        window = self.window(row, col)
        return Tile(row, col, window, self.polygon(window))

    @property
    def region_polygon(self) -> Polygon:
        """The processed region: the union of every tile's polygon when there is no AOI."""
        return window_polygon(self.transform, self.region)

    def __iter__(self) -> Iterator[Tile]:
        for row in range(len(self.row_offsets)):
            tiles = [self.tile(row, col) for col in range(len(self.col_offsets))]
            if self.aoi is not None:
                keep = _overlaps_area(self.aoi, [t.polygon for t in tiles])
                tiles = [t for t, k in zip(tiles, keep) if k]
            yield from tiles

    def __len__(self) -> int:
        if self._count is None:
            if self.aoi is None:
                self._count = len(self.row_offsets) * len(self.col_offsets)
            else:
                self._count = sum(1 for _ in self)
        return self._count


def window_polygon(transform: Affine, window: Window) -> Polygon:
    """Polygon of a pixel window's outer edges (exact for the rectilinear grids accepted)."""
    x0, y0 = transform * (window.col_off, window.row_off)
    x1, y1 = transform * (window.col_off + window.width, window.row_off + window.height)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _overlaps_area(aoi: BaseGeometry, polygons: list[Polygon]) -> np.ndarray:
    """Which polygons share area with the AOI (touching along an edge is not enough)."""
    polys = np.asarray(polygons, dtype=object)
    hits = shapely.intersects(aoi, polys)
    if hits.any():
        touching = shapely.touches(aoi, polys[hits])
        idx = np.flatnonzero(hits)
        hits[idx[touching]] = False
    return hits


def pixel_size_m(crs: Any, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """Ground size (x, y) of one pixel in metres, or ``None`` when the CRS has no CRS units.

    Projected CRSs: the nominal pixel size times the CRS's linear unit. Geographic CRSs:
    measured at the raster's centre in a local azimuthal-equidistant projection.
    """
    if crs is None:
        return None
    sx, sy = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs.is_projected:
        try:
            factor = float(crs.linear_units_factor[1])
        except Exception:  # noqa: BLE001 - an unknown unit: assume metres, as GDAL does
            factor = 1.0
        return sx * factor, sy * factor
    if crs.is_geographic:
        return _geographic_pixel_size_m(crs, transform, width, height)
    return None


def _geographic_pixel_size_m(crs: Any, transform: Affine, width: int,
                             height: int) -> tuple[float, float]:
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_transform

    col, row = width / 2.0, height / 2.0
    cx, cy = transform * (col, row)
    (lon,), (lat,) = warp_transform(crs, "EPSG:4326", [cx], [cy])
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    # Measure across many pixels (or the whole raster) so rounding in degrees cannot matter.
    span_c, span_r = min(width, 100) / 2.0, min(height, 100) / 2.0
    pts = [(col - span_c, row), (col + span_c, row), (col, row - span_r), (col, row + span_r)]
    xs, ys = zip(*(transform * p for p in pts))
    ex, ny = warp_transform(crs, local, list(xs), list(ys))
    size_x = math.hypot(ex[1] - ex[0], ny[1] - ny[0]) / (2 * span_c)
    size_y = math.hypot(ex[3] - ex[2], ny[3] - ny[2]) / (2 * span_r)
    return size_x, size_y


def grid_offsets(start: int, length: int, tile: int, stride: int) -> tuple[np.ndarray, bool]:
    """Window offsets along one axis over ``[start, start + length)`` and whether the last
    window was shifted inward (the edge policy in the module doc). ``length >= tile``."""
    offsets = np.arange(start, start + length - tile + 1, stride, dtype=np.int64)
    end = start + length
    shifted = int(offsets[-1]) + tile < end
    if shifted:
        offsets = np.append(offsets, end - tile)
    return offsets, shifted


def resolve_tile_size(tiling: TilingConfig, package: Any | None) -> tuple[float, str]:
    """(size, unit) of a tile: the user's, else the package's recommended footprint."""
    if tiling.tile_size is not None:
        return float(tiling.tile_size), tiling.unit
    if package is not None:
        if package.tile_footprint_m:
            return float(package.tile_footprint_m), "m"
        if package.gsd_m:
            return float(package.input_size * package.gsd_m), "m"
        return float(package.input_size), "px"
    raise CasdError(f"no tile size given and no model package to take one from; set the "
                    f"{param('tile_size')}")


def tile_grid(raster: str | os.PathLike | rasterio.io.DatasetReader, tiling: TilingConfig,
              package: Any | None = None) -> TileGrid:
    """The tile grid of ``raster`` (a path or an open rasterio dataset) under ``tiling``.

    Raises :class:`CasdError` for a raster without CRS, a rotated raster, an extent or AOI
    that misses the raster, a tile larger than the processed region, or a size in metres on
    a CRS without known units.
    """
    tiling.validate()
    if isinstance(raster, (str, os.PathLike)):
        with rasterio.open(raster) as dataset:
            return tile_grid(dataset, tiling, package)
    dataset = raster
    name = os.path.basename(str(dataset.name))
    if dataset.crs is None:
        raise CasdError(f"raster {name} has no coordinate reference system; assign one "
                        "(e.g. `gdal_edit.py -a_srs EPSG:<code>`) and run again")
    transform = dataset.transform
    if transform.b != 0 or transform.d != 0:
        raise CasdError(f"raster {name} is rotated; warp it to a north-up grid "
                        "(e.g. `gdalwarp`) and run again")

    size, unit = resolve_tile_size(tiling, package)
    stride = tiling.stride
    px_m = pixel_size_m(dataset.crs, transform, dataset.width, dataset.height)
    if unit == "m":
        if px_m is None:
            raise CasdError(f"the CRS of {name} has no known ground unit, so a tile size in "
                            f"metres cannot be used; set the {param('unit')} to pixels")
        tile_w, tile_h = (max(1, round(size / px_m[0])), max(1, round(size / px_m[1])))
        if stride is not None:
            stride_w, stride_h = (max(1, round(stride / px_m[0])), max(1, round(stride / px_m[1])))
    else:
        tile_w = tile_h = max(1, round(size))
        if stride is not None:
            stride_w = stride_h = max(1, round(stride))
    if stride is None:
        stride_w = max(1, round(tile_w * (1.0 - tiling.overlap)))
        stride_h = max(1, round(tile_h * (1.0 - tiling.overlap)))

    aoi = _aoi_in_raster_crs(tiling, dataset.crs)
    region = _processed_region(dataset, tiling.extent, aoi, name)
    size_text = (f"{tile_w}×{tile_h} px" if unit == "px"
                 else f"{size:g} m = {tile_w}×{tile_h} px")
    if region.width < tile_w or region.height < tile_h:
        what = "raster" if region.width == dataset.width and region.height == dataset.height \
            else "processed area (extent/AOI) of"
        raise CasdError(f"the {what} {name} is {int(region.width)}×{int(region.height)} px, "
                        f"smaller than one tile ({size_text}); choose a smaller {param('tile_size')}")
    rows, shifted_r = grid_offsets(int(region.row_off), int(region.height), tile_h, stride_h)
    cols, shifted_c = grid_offsets(int(region.col_off), int(region.width), tile_w, stride_w)
    ground = (tile_w * px_m[0], tile_h * px_m[1]) if px_m is not None else None
    grid = TileGrid(transform=transform, crs=dataset.crs, tile_shape=(tile_h, tile_w),
                    row_offsets=rows, col_offsets=cols, region=region, ground_size_m=ground,
                    edge_shifted=(bool(shifted_r), bool(shifted_c)), aoi=None)
    if aoi is not None:
        shapely.prepare(aoi)
        grid.aoi = aoi
        if len(grid) == 0:
            raise CasdError(f"no tile of {name} overlaps the {param('aoi')}; check that it covers "
                            "the raster and is in (or reprojectable to) its CRS")
    return grid


def _aoi_in_raster_crs(tiling: TilingConfig, crs: Any) -> BaseGeometry | None:
    if tiling.aoi is None or tiling.aoi_crs is None:
        return tiling.aoi
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    try:
        source = CRS.from_user_input(tiling.aoi_crs)
    except Exception:  # noqa: BLE001 - any unparsable CRS description
        raise CasdError(f"the CRS of the {param('aoi')} ({tiling.aoi_crs!r}) is not a CRS GDAL "
                        "knows; save it with a valid CRS") from None
    if source == crs:
        return tiling.aoi
    moved = shapely.geometry.shape(transform_geom(source, crs, shapely.geometry.mapping(tiling.aoi)))
    return shapely.make_valid(moved) if not moved.is_valid else moved


def _processed_region(dataset: Any, extent: tuple[float, float, float, float] | None,
                      aoi: BaseGeometry | None, name: str) -> Window:
    """The pixel window to tile: raster ∩ extent ∩ AOI bounds, snapped outward to pixels."""
    full = Window(0, 0, dataset.width, dataset.height)
    bounds = None
    if extent is not None:
        bounds = tuple(float(v) for v in extent)
    if aoi is not None:
        a = aoi.bounds
        bounds = a if bounds is None else (max(bounds[0], a[0]), max(bounds[1], a[1]),
                                           min(bounds[2], a[2]), min(bounds[3], a[3]))
        if bounds[0] >= bounds[2] or bounds[1] >= bounds[3]:
            raise CasdError(f"the {param('aoi')} does not overlap the {param('extent')} on {name}; "
                            "check both")
    if bounds is None:
        return full
    win = rasterio.windows.from_bounds(*bounds, transform=dataset.transform)
    col0, row0 = math.floor(win.col_off + 1e-9), math.floor(win.row_off + 1e-9)
    col1 = math.ceil(win.col_off + win.width - 1e-9)
    row1 = math.ceil(win.row_off + win.height - 1e-9)
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, dataset.width), min(row1, dataset.height)
    if col1 <= col0 or row1 <= row0:
        b = dataset.bounds
        what = param("aoi") if aoi is not None and extent is None else param("extent")
        raise CasdError(f"the {what} does not overlap raster {name} (its bounds are "
                        f"{b.left:g}, {b.bottom:g}, {b.right:g}, {b.top:g} in its CRS)")
    return Window(col0, row0, col1 - col0, row1 - row0)
