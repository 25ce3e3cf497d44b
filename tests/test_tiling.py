"""Tile grids on the real rasters: geometry, counts, edge policy, extent/AOI, CRS units."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.warp import calculate_default_transform, reproject, transform_geom
from rasterio.windows import from_bounds
from shapely.geometry import box, mapping, shape

from casd_core.errors import CasdError
from casd_core.tiling import TilingConfig, grid_offsets, pixel_size_m, tile_grid


@pytest.fixture(scope="module")
def tiled(rasters: Path) -> Path:
    return rasters / "test_tiled.tif"


@pytest.fixture(scope="module")
def naip(rasters: Path) -> Path:
    return rasters / "m_4709963_se_14_1_20200831.tif"


@pytest.fixture(scope="module")
def degrees_raster(tiled: Path, tmp_path_factory) -> Path:
    """test_tiled.tif warped to EPSG:4326 (a geographic CRS in degrees)."""
    out = tmp_path_factory.mktemp("deg") / "test_tiled_4326.tif"
    with rasterio.open(tiled) as src:
        transform, width, height = calculate_default_transform(
            src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": "EPSG:4326", "transform": transform, "width": width,
                                 "height": height, "compress": "deflate", "photometric": "rgb"}
        with rasterio.open(out, "w", **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band))
    return out


def _union_equals(polygons, region) -> bool:
    union = shapely.union_all(np.asarray(polygons, dtype=object))
    return union.symmetric_difference(region).area == 0 and union.equals(region)


def test_offsets_shift_last_window_inward():
    offsets, shifted = grid_offsets(0, 1000, 150, 150)
    assert offsets.tolist() == [0, 150, 300, 450, 600, 750, 850]
    assert shifted
    offsets, shifted = grid_offsets(10, 300, 100, 100)
    assert offsets.tolist() == [10, 110, 210] and not shifted


def test_grid_in_pixels_covers_raster_exactly(tiled):
    grid = tile_grid(tiled, TilingConfig(tile_size=150, unit="px"))
    assert grid.shape == (7, 7) and len(grid) == 49
    assert grid.edge_shifted == (True, True)
    tiles = list(grid)
    with rasterio.open(tiled) as ds:
        raster_box = box(*ds.bounds)
    assert _union_equals([t.polygon for t in tiles], raster_box)
    assert grid.region_polygon.equals(raster_box)
    # every tile full-size and inside the raster; only the shifted last row/col overlap
    for t in tiles:
        assert (t.window.width, t.window.height) == (150, 150)
        assert t.polygon.area == pytest.approx((150 * 0.25) ** 2)
        assert raster_box.contains(t.polygon)
    assert tiles[0].row == 0 and tiles[-1].row == 6 and tiles[-1].col == 6
    assert tiles[-1].polygon.bounds[2:] == (raster_box.bounds[2], raster_box.bounds[1] + 150 * 0.25)


@pytest.mark.parametrize("config, per_axis", [
    (TilingConfig(tile_size=150, unit="px", overlap=0.5), 13),  # stride 75: 0..825 + 850
    (TilingConfig(tile_size=150, unit="px", stride=100), 10),  # 0..800 + 850
    (TilingConfig(tile_size=200, unit="px", stride=200), 5),  # divides exactly, no shift
    (TilingConfig(tile_size=60, unit="m"), 5),  # 60 m = 240 px: 0..720 + 760
    (TilingConfig(tile_size=60, unit="m", stride=30), 8),  # stride 120 px: 0..720 + 760
])
def test_counts_for_stride_and_overlap(tiled, config, per_axis):
    grid = tile_grid(tiled, config)
    assert grid.shape == (per_axis, per_axis)
    tile_px = grid.tile_shape[0]
    stride_px = int(grid.col_offsets[1] - grid.col_offsets[0])
    assert per_axis == math.ceil((1000 - tile_px) / stride_px) + 1
    with rasterio.open(tiled) as ds:
        assert _union_equals([t.polygon for t in grid], box(*ds.bounds))


def test_metres_use_pixel_size_and_package_default(tiled, naip):
    grid = tile_grid(tiled, TilingConfig(tile_size=120, unit="m"))
    assert grid.tile_shape == (480, 480) and grid.ground_size_m == (120.0, 120.0)

    class Package:  # the package fields tile_grid reads
        tile_footprint_m, gsd_m, input_size = 120.0, None, 150
    # the same ground size on a 5 m raster: 24 px
    grid = tile_grid(naip, TilingConfig(), Package())
    assert grid.tile_shape == (24, 24)
    Package.tile_footprint_m = None
    assert tile_grid(naip, TilingConfig(), Package()).tile_shape == (150, 150)  # input size, px
    Package.gsd_m = 2.0
    assert tile_grid(naip, TilingConfig(), Package()).tile_shape == (60, 60)  # 150 px * 2 m
    with pytest.raises(CasdError, match="no tile size"):
        tile_grid(naip, TilingConfig())


def test_polygon_covers_the_pixels_it_was_read_from(naip):
    grid = tile_grid(naip, TilingConfig(tile_size=600, unit="m", overlap=0.25))
    with rasterio.open(naip) as ds:
        for tile in list(grid)[::7]:
            assert tile.polygon.bounds == ds.window_bounds(tile.window)
            back = from_bounds(*tile.polygon.bounds, transform=ds.transform).round_offsets().round_lengths()
            assert (back.col_off, back.row_off, back.width, back.height) == \
                (tile.window.col_off, tile.window.row_off, tile.window.width, tile.window.height)
            np.testing.assert_array_equal(ds.read(window=tile.window), ds.read(window=back))
            # the tile's first/last pixel centres fall inside its polygon
            x0, y0 = ds.xy(tile.window.row_off, tile.window.col_off)
            x1, y1 = ds.xy(tile.window.row_off + tile.window.height - 1,
                           tile.window.col_off + tile.window.width - 1)
            assert tile.polygon.contains(shapely.points([x0, x1], [y0, y1])).all()


def test_extent_is_snapped_outward_and_covered(tiled):
    extent = (127400.1, 428010.0, 127560.0, 428190.3)
    grid = tile_grid(tiled, TilingConfig(tile_size=40, unit="m", extent=extent))
    region = grid.region_polygon
    assert region.bounds == (127400.0, 428010.0, 127560.0, 428190.5)
    assert region.contains(box(*extent))
    assert _union_equals([t.polygon for t in grid], region)
    with pytest.raises(CasdError, match="does not overlap"):
        tile_grid(tiled, TilingConfig(tile_size=40, unit="m", extent=(0, 0, 10, 10)))
    with pytest.raises(CasdError, match="smaller than one tile"):
        tile_grid(tiled, TilingConfig(tile_size=40, unit="m", extent=(127400, 428010, 127420, 428030)))


def test_aoi_keeps_only_overlapping_tiles(tiled):
    with rasterio.open(tiled) as ds:
        centre = shapely.Point((ds.bounds.left + ds.bounds.right) / 2, (ds.bounds.bottom + ds.bounds.top) / 2)
    aoi = centre.buffer(50)
    full = tile_grid(tiled, TilingConfig(tile_size=10, unit="m"))
    grid = tile_grid(tiled, TilingConfig(tile_size=10, unit="m", aoi=aoi))
    kept = list(grid)
    assert 0 < len(kept) == len(grid) < len(full)
    assert all(t.polygon.intersection(aoi).area > 0 for t in kept)
    assert grid.region_polygon.contains(aoi)
    # the kept tiles cover the AOI, and every dropped window of the region misses it
    assert shapely.union_all([t.polygon for t in kept]).contains(aoi)
    kept_ids = {(t.row, t.col) for t in kept}
    dropped = [grid.tile(r, c) for r in range(grid.shape[0]) for c in range(grid.shape[1])
               if (r, c) not in kept_ids]
    assert dropped and all(t.polygon.intersection(aoi).area == 0 for t in dropped)
    # the same AOI given in WGS84 is reprojected to the raster's CRS
    aoi_4326 = shape(transform_geom("EPSG:28992", "EPSG:4326", mapping(aoi)))
    again = tile_grid(tiled, TilingConfig(tile_size=10, unit="m", aoi=aoi_4326, aoi_crs="EPSG:4326"))
    again_tiles = list(again)
    assert shapely.union_all([t.polygon for t in again_tiles]).contains(aoi.buffer(-0.01))
    assert all(t.polygon.intersection(aoi).area > 0 for t in again_tiles)
    with pytest.raises(CasdError, match="overlap"):
        tile_grid(tiled, TilingConfig(tile_size=10, unit="m", aoi=box(0, 0, 10, 10)))


def test_degrees_with_metres(degrees_raster, tiled):
    with rasterio.open(degrees_raster) as ds:
        assert ds.crs.is_geographic
        size = pixel_size_m(ds.crs, ds.transform, ds.width, ds.height)
    # RD New at 0.25 m warped to degrees keeps roughly its resolution
    assert 0.15 < size[0] < 0.4 and 0.15 < size[1] < 0.4
    grid = tile_grid(degrees_raster, TilingConfig(tile_size=60, unit="m"))
    assert grid.ground_size_m[0] == pytest.approx(60, rel=0.01)
    tile = next(iter(grid))
    # measured in the original metric CRS, the tile is 60 m on the ground
    in_rd = shape(transform_geom("EPSG:4326", "EPSG:28992", mapping(tile.polygon)))
    minx, miny, maxx, maxy = in_rd.bounds
    assert maxx - minx == pytest.approx(60, rel=0.02)
    assert maxy - miny == pytest.approx(60, rel=0.02)
    with rasterio.open(degrees_raster) as ds:
        assert _union_equals([t.polygon for t in grid], box(*ds.bounds))


def test_refusals(tmp_path, tiled):
    with rasterio.open(tiled) as src:
        profile = src.profile | {"crs": None, "compress": "deflate", "photometric": "rgb"}
        data = src.read(window=rasterio.windows.Window(0, 0, 256, 256))
        profile.update(width=256, height=256)
        with rasterio.open(tmp_path / "no_crs.tif", "w", **profile) as dst:
            dst.write(data)
    with pytest.raises(CasdError, match="no coordinate reference system"):
        tile_grid(tmp_path / "no_crs.tif", TilingConfig(tile_size=64, unit="px"))
    with pytest.raises(CasdError, match=r"raster test_tiled.tif is 1000×1000 px, smaller than one tile"):
        tile_grid(tiled, TilingConfig(tile_size=300, unit="m"))
    for bad in (TilingConfig(unit="ft"), TilingConfig(overlap=1.0), TilingConfig(tile_size=-1),
                TilingConfig(nodata_threshold=2), TilingConfig(bands=(0, 1, 2)),
                TilingConfig(extent=(3, 0, 1, 1)), TilingConfig(stride=0)):
        with pytest.raises(CasdError):
            tile_grid(tiled, bad)

