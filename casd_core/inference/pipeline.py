"""Stream the :class:`TilePrediction` of one raster: windows -> background reads -> batched
model -> tile predictions (writing them to a file is :mod:`casd_core.inference.classify`).

Stages (each testable alone)::

    tile_grid (windows, row by row) -> TileReader (background threads: windowed, resampled
    reads + nodata fraction) -> bounded queue -> Predictor (batched, inference mode) ->
    TilePrediction stream

Memory does not grow with the raster: the grid is two offset arrays, at most
``workers + 1`` batches are read ahead, and GDAL's block cache is capped to the block rows one
row of tiles spans. Tiles whose nodata fraction exceeds ``TilingConfig.nodata_threshold`` are
*skipped*: not classified, not yielded, counted in ``TileStream.skipped_nodata``.

On CPU, :class:`~casd_core.runtime.ThreadTuner` falls back to one thread while another
process wants the cores, where a spinning team of OpenMP threads runs 2-10x slower
(docs/BENCHMARKS.md). On CUDA, forked reader processes fill pinned slots instead of reader
threads (``InferenceConfig.reader_processes``), and each batch is queued on the GPU before the
previous one's result is awaited (:mod:`casd_core.inference.gpu_feed`).
``iter_tile_predictions(part=...)`` streams one block of grid rows: a rank's share under ``torchrun``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
from rasterio.env import get_gdal_config, set_gdal_config

from casd_core.errors import CasdError, param
from casd_core.inference.labels import CellAverager, Placed, TilePrediction, label
from casd_core.inference.predictor import Predictor
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.inference.raster import RasterPlan, plan_raster
from casd_core.inference.reader import ProcessTileReader, TileReader
from casd_core.progress import Monitor
from casd_core.runtime import ThreadTuner
from casd_core.tiling import Tile, TileGrid, TilingConfig

if TYPE_CHECKING:  # the torch Predictor's batches; the onnxruntime one uses numpy only
    import torch


@dataclass
class InferenceConfig:
    """How to run the model and label its output.

    ``batch_size`` tiles per forward pass; ``device`` "auto", "cpu", "cuda", "cuda:1", "mps";
    ``workers`` background reader threads (0 reads in the calling thread, without overlap;
    one is right almost always on CPU: every extra reader keeps its own dataset handle, and
    blocks that two readers touch are decoded twice). ``reader_processes`` feeds the model
    from that many forked reader processes instead of threads (what a GPU needs to stay
    busy: see :mod:`casd_core.inference.gpu_feed`); ``None`` means, on CUDA, one per core
    of this process's share of the node (torchrun: one process per GPU) but one, and threads
    elsewhere; 0 always threads. ``tta`` averages the 8 flips/rotations of each
    tile (8x the cost); ``min_score`` makes tiles whose calibrated top probability is lower
    abstain ("uncertain"); ``smooth`` averages overlapping windows onto the cells their edges
    make (see :mod:`casd_core.inference.labels`).
    """

    batch_size: int = 32
    device: str = "auto"
    workers: int = 1
    reader_processes: int | None = None
    tta: bool = False
    min_score: float | None = None
    smooth: bool = False

    def validate(self) -> None:
        if self.batch_size < 1:
            raise CasdError(f"{param('batch_size')} {self.batch_size} must be at least 1")
        if self.workers < 0:
            raise CasdError(f"{param('workers')} {self.workers} must be 0 or more")
        if self.reader_processes is not None and self.reader_processes < 0:
            raise CasdError(f"{param('reader_processes')} {self.reader_processes} must be 0 or more")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise CasdError(f"{param('min_score')} {self.min_score} must be a probability in [0, 1]")


def row_block(grid: TileGrid, rows: tuple[int, int]) -> tuple[Iterator[Tile], int]:
    """The tiles of grid rows ``rows[0]`` to ``rows[1]`` (exclusive), numbered as in the whole
    grid, and how many there are."""
    first, stop = rows
    part = dataclasses.replace(grid, row_offsets=grid.row_offsets[first:stop], _count=None)
    return (dataclasses.replace(tile, row=tile.row + first) for tile in part), len(part)


def _batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    batch: list[Tile] = []
    for tile in tiles:
        batch.append(tile)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _LoadedBatch:
    tiles: list[Tile]
    fractions: np.ndarray
    keep: np.ndarray  # indexes of the tiles to classify
    staged: np.ndarray | torch.Tensor | None
    release: Callable[[], None] | None = None  # hands a reader process's slot back


class TileStream:
    """Iterator over the :class:`TilePrediction` of one raster (see the module doc).

    Counters (``total`` windows; ``labelled`` features, of which ``uncertain`` abstained;
    ``skipped_nodata`` windows) are filled while iterating. A
    raster whose tiles are all skipped raises :class:`CasdError` at the end, having yielded
    nothing. ``rows`` (first, stop) streams only that block of grid rows (one rank's part of
    a raster); then an all-nodata block is not an error, the whole raster decides.
    """

    def __init__(self, plan: RasterPlan, predictor: Predictor, inference: InferenceConfig,
                 monitor: Monitor, rows: tuple[int, int] | None = None) -> None:
        self.plan = plan
        self.predictor = predictor
        self.inference = inference
        self.monitor = monitor
        self.rows = rows
        if rows is None:
            self._tiles, self.total = iter(plan.grid), len(plan.grid)
        else:
            self._tiles, self.total = row_block(plan.grid, rows)
        self.labelled = 0
        self.uncertain = 0
        self.skipped_nodata = 0
        self._iterator = self._run()

    def __iter__(self) -> "TileStream":
        return self

    def __next__(self) -> TilePrediction:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()

    def _load(self, reader: TileReader, tiles: list[Tile]) -> _LoadedBatch:
        """Read a batch, drop its nodata tiles and stage the rest (runs on a reader thread)."""
        raw, fractions = reader.read(tiles)
        if self.plan.mapping is not None:
            raw = self.plan.mapping.apply(raw, band_axis=1)
        return self._staged(tiles, raw, fractions)

    def _staged(self, tiles: list[Tile], values: np.ndarray, fractions: np.ndarray) -> _LoadedBatch:
        """Drop a batch's nodata tiles and stage the rest (``values`` mapped already)."""
        keep = np.flatnonzero(fractions <= self.plan.nodata_threshold)
        staged = None
        if len(keep):
            staged = self.predictor.stage(values)
            if len(keep) < len(tiles):
                staged = staged[keep]  # numpy indexes numpy arrays and torch tensors alike
        return _LoadedBatch(tiles, fractions, keep, staged)

    def _loaded_batches(self, reader: TileReader) -> Iterator[_LoadedBatch]:
        """Batches in grid order; with workers, read ahead by at most ``workers + 1``."""
        workers = self.inference.workers
        batches = _batches(self._tiles, self.inference.batch_size)
        processes = self._reader_processes()
        if processes:
            yield from self._process_batches(batches, processes)
            return
        if workers == 0:
            for tiles in batches:
                yield self._load(reader, tiles)
            return
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="casd-read")
        pending: collections.deque = collections.deque()
        try:
            for tiles in batches:
                pending.append(executor.submit(self._load, reader, tiles))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def _reader_processes(self) -> int:
        """How many reader processes feed the model (0: reader threads)."""
        wanted = self.inference.reader_processes
        if not ProcessTileReader.available():
            return 0
        if wanted is None:
            if self.predictor.device.type != "cuda":
                return 0
            from casd_core.distributed import processes_per_node

            # This process's share of the node's cores (torchrun: one process per GPU), less
            # the one the model's own thread runs on.
            return max(1, len(os.sched_getaffinity(0)) // processes_per_node() - 1)
        return wanted

    def _process_batches(self, batches: Iterator[list[Tile]], processes: int) -> Iterator[_LoadedBatch]:
        """Batches read by forked processes into shared slots; on CUDA the slots are pinned."""
        # Enough slots for every process to read one while two batches sit on the GPU.
        reader = ProcessTileReader(self.plan, self.inference.batch_size, processes, processes + 3)
        pinned = None
        if self.predictor.device.type == "cuda":
            from casd_core.inference.gpu_feed import PinnedSlots

            pinned = PinnedSlots(reader.slots)
        try:
            for tiles, values, fractions, release in reader.batches(batches):
                batch = self._staged(tiles, values, fractions)
                batch.release = release
                yield batch
        finally:
            if pinned is not None:
                pinned.close()
            reader.close()

    def _predicted(self, batches: Iterator[_LoadedBatch], tuner: ThreadTuner
                   ) -> Iterator[tuple[_LoadedBatch, Any]]:
        """(batch, probabilities of its kept tiles or None) in order. On CUDA each batch is
        queued before the previous one's result is awaited, so the GPU computes while the
        CPU labels; elsewhere one batch at a time, timed for the thread tuner."""
        launcher = None
        if self.predictor.device.type == "cuda" and hasattr(self.predictor, "_logits"):
            from casd_core.inference.gpu_feed import CudaLauncher

            launcher = CudaLauncher(self.predictor, self.inference.tta)
        in_flight: collections.deque = collections.deque()
        for batch in batches:
            if launcher is not None:
                in_flight.append((batch, launcher.launch(batch.staged) if len(batch.keep) else None))
                if len(in_flight) > 1:
                    yield self._landed(launcher, *in_flight.popleft())
                continue
            probabilities = None
            if len(batch.keep):
                start = time.perf_counter()
                probabilities = self.predictor.predict_staged(batch.staged, self.inference.tta)
                tuner.record(len(batch.keep), time.perf_counter() - start)
            if batch.release is not None:
                batch.release()
            yield batch, probabilities
        while in_flight:
            yield self._landed(launcher, *in_flight.popleft())

    @staticmethod
    def _landed(launcher: Any, batch: _LoadedBatch, launched: Any) -> tuple[_LoadedBatch, Any]:
        probabilities = launcher.result(launched) if launched is not None else None
        if batch.release is not None:  # its copy to the GPU is over
            batch.release()
        return batch, probabilities

    def _run(self) -> Iterator[TilePrediction]:
        plan, predictor, monitor, inference = self.plan, self.predictor, self.monitor, self.inference
        reader = TileReader(plan)
        averager = CellAverager(plan.grid) if inference.smooth else None
        done = 0
        began = time.perf_counter()
        monitor.report("tiles", 0, self.total)
        # GDAL's block cache is process-wide (default 5% of RAM): cap it while reading so
        # memory stays flat on huge rasters; restored afterwards.
        previous_cache = get_gdal_config("GDAL_CACHEMAX")
        set_gdal_config("GDAL_CACHEMAX", plan.cache_bytes)
        tuner = ThreadTuner(enabled=predictor.device.type == "cpu")
        loaded = self._loaded_batches(reader)
        predicted = self._predicted(loaded, tuner)
        try:
            for batch, probs in predicted:
                monitor.check_cancelled()
                tiles, fractions, keep = batch.tiles, batch.fractions, batch.keep
                self.skipped_nodata += len(tiles) - len(keep)
                if len(keep):
                    if averager is None:
                        places = [Placed(tiles[i].polygon, tiles[i].row, tiles[i].col, tiles[i].window,
                                         float(fractions[i])) for i in keep]
                        yield from self._labelled(probs, places)
                    else:
                        for j, i in enumerate(keep):
                            for cells, places in averager.add(tiles[i], np.asarray(probs[j]), float(fractions[i])):
                                yield from self._labelled(cells, places)
                done += len(tiles)
                monitor.report("tiles", done, self.total,
                               rate=done / max(time.perf_counter() - began, 1e-9))
            if averager is not None:
                for cells, places in averager.finish():
                    yield from self._labelled(cells, places)
            if self.labelled == 0 and self.rows is None:
                raise CasdError(
                    f"every tile of {plan.name} has more than {plan.nodata_threshold:.0%} nodata, so "
                    f"nothing was labelled; check the nodata value or raise {param('nodata_threshold')}")
        finally:
            # Join the reader threads before their dataset closes: after an error or a cancel
            # here, the suspended generators would otherwise only close when collected, and a
            # thread still reading a closed GDAL dataset crashes the process (QGIS with it).
            predicted.close()
            loaded.close()
            reader.close()
            tuner.restore()
            if isinstance(previous_cache, int):
                set_gdal_config("GDAL_CACHEMAX", previous_cache)

    def _labelled(self, probabilities: "np.ndarray | torch.Tensor", places: list[Placed]) -> list[TilePrediction]:
        predictions = label(probabilities, places, self.predictor.class_names,
                            self.predictor.name, self.inference.min_score)
        self.labelled += len(predictions)
        self.uncertain += sum(1 for p in predictions if p.class_id is None)
        return predictions


def iter_tile_predictions(raster_path: str | os.PathLike, predictor: Predictor,
                          tiling: TilingConfig | None = None,
                          inference: InferenceConfig | None = None,
                          monitor: Monitor | None = None,
                          radiometry: RadiometryConfig | None = None,
                          part: tuple[int, int] | None = None) -> TileStream:
    """Validate the raster and settings now (raising :class:`CasdError`), then stream
    predictions tile by tile, reading in the background while the model runs. A value
    mapping chosen for the raster is announced through ``monitor.warn``. ``part`` (index,
    count): only the index-th of ``count`` blocks of whole grid rows, as even as rows allow."""
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    inference.validate()
    monitor = monitor or Monitor()
    plan = plan_raster(raster_path, predictor.package, tiling, radiometry)
    if inference.smooth and tiling.overlap == 0 and tiling.stride is None:
        monitor.warn(f"{param('smooth')} has little to average: the tiles do not overlap "
                     f"(set an {param('overlap')} such as 0.5)")
    if plan.mapping is not None:
        monitor.warn(f"{plan.name}: its values do not fit the model's, so they are mapped: "
                     f"{plan.mapping.description} (set {param('stretch')} to none to feed them raw)")
    rows = None
    if part is not None:
        index, count = part
        edges = np.linspace(0, plan.grid.shape[0], count + 1).round().astype(int)
        rows = (int(edges[index]), int(edges[index + 1]))
    return TileStream(plan, predictor, inference, monitor, rows)
