"""From class probabilities to labelled features: top-3, margin, entropy, abstention, and the
averaging of overlapping windows onto the cells their edges cut the raster into.

Abstention: a tile whose (calibrated) top probability is below ``min_score`` gets no class:
``class_id`` is null and ``class_name`` is :data:`UNCERTAIN`, drawn grey; its top-3 stay.

Smoothing: with overlapping windows, the edges of all windows cut the processed region into
cells (with 50 % overlap, four per window). Each cell gets the mean probability of the
classified windows covering it, so the output is a grid of non-overlapping cells whose labels
change smoothly, instead of overlapping squares. Windows arrive row by row, so a row of cells
is final as soon as the windows start below it: memory holds a few rows of cells, not the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from rasterio.windows import Window
from shapely.geometry import Polygon

from casd_core.style import UNCERTAIN
from casd_core.tiling import Tile, TileGrid


@dataclass
class TilePrediction:
    """One classified tile (or smoothed cell): its ground polygon (raster CRS) and the output
    fields. ``class_id`` is ``None`` and ``class_name`` :data:`UNCERTAIN` when it abstained."""

    geometry: Polygon
    row: int
    col: int
    window: Window
    class_id: int | None
    class_name: str
    score: float
    margin: float
    entropy: float
    top1_class: str
    top1_prob: float
    top2_class: str | None
    top2_prob: float | None
    top3_class: str | None
    top3_prob: float | None
    nodata_fraction: float
    model: str


@dataclass(frozen=True)
class Placed:
    """Where a probability vector belongs: geometry, grid row/col, pixel window, nodata share."""

    geometry: Polygon
    row: int
    col: int
    window: Window
    nodata_fraction: float


def label(probabilities: np.ndarray, places: list[Placed], class_names: list[str], model: str,
          min_score: float | None = None) -> list[TilePrediction]:
    """Features for a batch of probability vectors (N, K), vectorised over the batch.

    ``probabilities``: anything numpy reads as an array (a CPU torch tensor too), so both model
    runtimes feed it."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    k = min(3, len(class_names))
    log_k = math.log(len(class_names)) if len(class_names) > 1 else 1.0
    top_i = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probabilities, top_i, axis=1)
    entropy = (-(probabilities * np.log(np.maximum(probabilities, 1e-12))).sum(1) / log_k).tolist()
    top_p, top_i = top_p.tolist(), top_i.tolist()
    out = []
    for j, place in enumerate(places):
        p, c = top_p[j], top_i[j]
        sure = min_score is None or p[0] >= min_score
        out.append(TilePrediction(
            geometry=place.geometry, row=place.row, col=place.col, window=place.window,
            class_id=c[0] if sure else None, class_name=class_names[c[0]] if sure else UNCERTAIN,
            score=p[0], margin=p[0] - (p[1] if k > 1 else 0.0), entropy=max(0.0, entropy[j]),
            top1_class=class_names[c[0]], top1_prob=p[0],
            top2_class=class_names[c[1]] if k > 1 else None, top2_prob=p[1] if k > 1 else None,
            top3_class=class_names[c[2]] if k > 2 else None, top3_prob=p[2] if k > 2 else None,
            nodata_fraction=place.nodata_fraction, model=model))
    return out


class CellAverager:
    """Accumulates window probabilities onto cells and hands back each row of cells once no
    later window can cover it (see the module doc)."""

    def __init__(self, grid: TileGrid) -> None:
        height, width = grid.tile_shape
        self.grid = grid
        self.row_edges = np.unique(np.concatenate([grid.row_offsets, grid.row_offsets + height]))
        self.col_edges = np.unique(np.concatenate([grid.col_offsets, grid.col_offsets + width]))
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # sums, counts, nodata

    def add(self, tile: Tile, probabilities: np.ndarray, nodata_fraction: float
            ) -> Iterator[tuple[np.ndarray, list[Placed]]]:
        """Add one window; yields (probabilities, places) of the cell rows it completes."""
        window = tile.window
        yield from self._flush(below=int(window.row_off))
        r0, r1 = np.searchsorted(self.row_edges, [window.row_off, window.row_off + window.height])
        c0, c1 = np.searchsorted(self.col_edges, [window.col_off, window.col_off + window.width])
        for row in range(r0, r1):
            if row not in self._rows:
                n = len(self.col_edges) - 1
                self._rows[row] = (np.zeros((n, len(probabilities))), np.zeros(n), np.zeros(n))
            sums, counts, nodata = self._rows[row]
            sums[c0:c1] += probabilities
            counts[c0:c1] += 1
            nodata[c0:c1] += nodata_fraction

    def finish(self) -> Iterator[tuple[np.ndarray, list[Placed]]]:
        yield from self._flush(below=None)

    def _flush(self, below: int | None) -> Iterator[tuple[np.ndarray, list[Placed]]]:
        for row in sorted(self._rows):
            if below is not None and self.row_edges[row + 1] > below:
                break
            sums, counts, nodata = self._rows.pop(row)
            covered = np.flatnonzero(counts)
            if not len(covered):
                continue
            top, bottom = int(self.row_edges[row]), int(self.row_edges[row + 1])
            places = []
            for col in covered:
                left, right = int(self.col_edges[col]), int(self.col_edges[col + 1])
                window = Window(left, top, right - left, bottom - top)
                places.append(Placed(self.grid.polygon(window), int(row), int(col), window,
                                     float(nodata[col] / counts[col])))
            yield sums[covered] / counts[covered, None], places
