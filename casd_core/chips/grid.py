"""Which tiles of a raster's grid become chips: coverage by one class, mixed classes, and the
polygons each chip belongs to.

Candidates are the tiles of the same grid ``casd predict`` uses (:func:`casd_core.tiling.tile_grid`,
windows from the raster's top-left corner in steps of the stride) whose window meets a
polygon's bounding box, found by binary search in the grid's offsets, so the cost follows the
labelled area, not the raster's. Coverage of a class is the share of the chip inside the
union of that class's polygons (overlapping polygons of one class are not counted twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio.windows
import shapely
from rasterio.windows import Window
from shapely.geometry import Polygon

from casd_core.tiling import TileGrid

# A tile covered less than this is not "touched" by the labels: such slivers come from edges
# that lie on the tile grid in one CRS and, reprojected, a few micrometres beside it.
SLIVER = 1e-4


@dataclass
class Candidate:
    """A tile that polygons of one class cover well enough: its grid cell, window, footprint
    (raster CRS), class, the polygon covering most of it (index into the labels), every
    same-class polygon it overlaps, and the covered share."""

    row: int
    col: int
    window: Window
    footprint: Polygon
    label: str
    polygon: int
    polygons: tuple[int, ...]
    coverage: float


@dataclass
class GridResult:
    candidates: list[Candidate]
    mixed: int
    low_coverage: int
    overlapping: np.ndarray  # per polygon: shares area with the raster


def find_candidates(grid: TileGrid, geometries: np.ndarray, classes: np.ndarray,
                    raster_box: Polygon, min_coverage: float, max_other: float) -> GridResult:
    """Tiles of ``grid`` where one class covers ``min_coverage`` and the others at most
    ``max_other`` (a *mixed* tile otherwise); counts what was dropped."""
    overlapping = shapely.intersects(raster_box, geometries) & ~shapely.touches(raster_box, geometries)
    tile_h, tile_w = grid.tile_shape
    cells: set[tuple[int, int]] = set()
    for geometry in geometries[overlapping]:
        win = rasterio.windows.from_bounds(*geometry.bounds, transform=grid.transform)
        r0, r1 = _span(grid.row_offsets, win.row_off, win.height, tile_h)
        c0, c1 = _span(grid.col_offsets, win.col_off, win.width, tile_w)
        cells.update((r, c) for r in range(r0, r1) for c in range(c0, c1))
    if not cells:
        return GridResult([], 0, 0, overlapping)
    rows, cols = np.array(sorted(cells)).T
    windows = [grid.window(int(r), int(c)) for r, c in zip(rows, cols)]
    boxes = np.array([grid.polygon(w) for w in windows], dtype=object)
    area = shapely.area(boxes[0])

    index = np.flatnonzero(overlapping)
    names = sorted(set(classes[index].tolist()))
    coverage = np.zeros((len(boxes), len(names)))
    for k, name in enumerate(names):
        members = index[classes[index] == name]
        union = shapely.union_all(geometries[members])
        shapely.prepare(union)
        hit = np.flatnonzero(shapely.intersects(union, boxes))
        if len(hit):
            coverage[hit, k] = shapely.area(shapely.intersection(boxes[hit], union)) / area

    tree = shapely.STRtree(geometries[index])
    pair_box, pair_poly = tree.query(boxes, predicate="intersects")
    pair_poly = index[pair_poly]
    pair_area = shapely.area(shapely.intersection(boxes[pair_box], geometries[pair_poly]))

    best = coverage.argmax(axis=1)
    best_cov = coverage[np.arange(len(boxes)), best]
    other = coverage.sum(axis=1) - best_cov
    touched = best_cov >= SLIVER
    mixed = touched & (other > max_other)
    low = touched & ~mixed & (best_cov < min_coverage - 1e-9)
    keep = np.flatnonzero(touched & ~mixed & ~low)
    candidates = []
    for i in keep:
        label = names[best[i]]
        mine = (pair_box == i) & (classes[pair_poly] == label) & (pair_area >= SLIVER * area)
        polys, areas = pair_poly[mine], pair_area[mine]
        candidates.append(Candidate(int(rows[i]), int(cols[i]), windows[i], boxes[i], label,
                                    int(polys[np.argmax(areas)]), tuple(int(p) for p in polys),
                                    float(min(best_cov[i], 1.0))))
    return GridResult(candidates, int(mixed.sum()), int(low.sum()), overlapping)


def _span(offsets: np.ndarray, start: float, length: float, tile: int) -> tuple[int, int]:
    """Indices [lo, hi) of the windows along one axis that overlap ``[start, start + length)``."""
    lo = int(np.searchsorted(offsets, start - tile, side="right"))
    hi = int(np.searchsorted(offsets, start + length, side="left"))
    return lo, hi
