"""Reading tiles: batches of windows as raw arrays plus each tile's nodata fraction.

Adjacent tiles of a grid row read 1:1 are fetched with one window read; resampled tiles are
read one by one with GDAL's resampling (average when shrinking, bilinear when enlarging).
(GDAL's multi-threaded block decoding, ``NUM_THREADS``, was tried: no gain in the whole
pipeline on 2 cores, 50-100 MB more memory.) Nodata pixels of a tile are filled with the
band mean, i.e. 0 after normalisation.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from casd_core.errors import CasdError
from casd_core.inference.raster import RasterPlan, nodata_mask
from casd_core.tiling import Tile


class TileReader:
    """Reads batches of tiles as raw arrays (N, C, H, W) plus each tile's nodata fraction.

    The arrays are (N, C, H, W) views of pixel-interleaved (N, H, W, C) memory.

    Thread-safe: each thread opens its own dataset handle (rasterio handles are not
    shareable); :meth:`close` closes them all.
    """

    def __init__(self, plan: RasterPlan) -> None:
        self.plan = plan
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def _dataset(self) -> Any:
        dataset = getattr(self._local, "dataset", None)
        if dataset is None:
            dataset = rasterio.open(self.plan.path)
            self._local.dataset = dataset
            with self._lock:
                self._handles.append(dataset)
        return dataset

    def read(self, tiles: list[Tile]) -> tuple[np.ndarray, np.ndarray]:
        plan = self.plan
        dataset = self._dataset()
        height, width = plan.out_shape
        # Pixel-interleaved memory seen as (N, C, H, W): GDAL decodes interleaved pixels and
        # the model runs channels_last, so no layout change happens anywhere on the way.
        base = np.empty((len(tiles), height, width, len(plan.bands)), dtype=plan.dtype)
        out = base.transpose(0, 3, 1, 2)
        for run in self._runs(tiles):
            if len(run) == 1:
                self._read_window(dataset, tiles[run[0]], out[run[0]])
                continue
            # One read for a row of adjacent 1:1 tiles, then cut into tiles.
            first, last = tiles[run[0]].window, tiles[run[-1]].window
            strip = np.empty((height, last.col_off + width - first.col_off, len(plan.bands)),
                             dtype=plan.dtype)
            span = Window(first.col_off, first.row_off, strip.shape[1], height)
            self._read_window(dataset, tiles[run[0]], strip.transpose(2, 0, 1), span)
            for i in run:
                offset = tiles[i].window.col_off - first.col_off
                base[i] = strip[:, offset:offset + width]
        fractions = np.zeros(len(tiles), dtype=np.float64)
        if plan.mask_mode == "none" and plan.padding is None and out.dtype.kind != "f":
            return out, fractions
        for i, tile in enumerate(tiles):
            mask = None
            if plan.mask_mode == "mask":
                mask = dataset.read_masks(plan.bands[0], window=tile.window,
                                          out_shape=(height, width),
                                          resampling=Resampling.nearest)
            invalid = nodata_mask(out[i], plan, mask)
            if plan.padding is not None:
                invalid |= plan.padding.pixels(out[i], tile.window)
            fractions[i] = float(invalid.mean())
            if fractions[i] > 0:
                out[i][:, invalid] = plan.fill[:, None]
        return out, fractions

    def _runs(self, tiles: list[Tile]) -> list[list[int]]:
        """Tile indexes grouped into horizontal runs that one window read can serve: same
        row, adjacent or overlapping, read 1:1 (resampled tiles are read one by one)."""
        plan = self.plan
        if plan.resampling != Resampling.nearest or plan.out_shape != plan.grid.tile_shape:
            return [[i] for i in range(len(tiles))]
        width = plan.out_shape[1]
        runs: list[list[int]] = []
        for i, tile in enumerate(tiles):
            if runs:
                previous = tiles[runs[-1][-1]].window
                if (tile.window.row_off == previous.row_off
                        and previous.col_off < tile.window.col_off <= previous.col_off + width):
                    runs[-1].append(i)
                    continue
            runs.append([i])
        return runs

    def _read_window(self, dataset: Any, tile: Tile, out: np.ndarray,
                     window: Window | None = None) -> None:
        try:
            dataset.read(self.plan.bands, window=window or tile.window, out=out,
                         resampling=self.plan.resampling)
        except RasterioIOError as exc:
            reason = str(exc).split("\n")[0]
            raise CasdError(f"reading tile row {tile.row}, column {tile.col} of {self.plan.name} "
                            f"failed ({reason}); the file may be damaged") from None

    def close(self) -> None:
        with self._lock:
            for dataset in self._handles:
                dataset.close()
            self._handles.clear()

