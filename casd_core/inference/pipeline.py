"""The streaming pipeline over one raster: windows -> background reads -> batched model ->
tile predictions -> atomic vector output.

Stages (each testable alone)::

    tile_grid (windows, row by row) -> TileReader (background threads: windowed, resampled
    reads + nodata fraction) -> bounded queue -> Predictor (batched, inference mode) ->
    TilePrediction stream -> vectorio.write_predictions (atomic)

Memory does not grow with the raster: the grid is two offset arrays, at most
``workers + 1`` batches are read ahead, GDAL's block cache is capped to the block rows one
row of tiles spans, and predictions are kept as compact columns until the atomic write.
Tiles whose nodata fraction exceeds ``TilingConfig.nodata_threshold`` are *skipped*: not
classified, not yielded, counted in ``TileStream.skipped_nodata``.

On CPU, :class:`~casd_core.runtime.ThreadTuner` falls back to one thread while another
process wants the cores, where a spinning team of OpenMP threads runs 2-10x slower
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rasterio.env import get_gdal_config, set_gdal_config

from casd_core import vectorio
from casd_core.errors import CasdError, param
from casd_core.inference.labels import CellAverager, Placed, TilePrediction, label
from casd_core.inference.predictor import Predictor
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.inference.raster import RasterPlan, plan_raster
from casd_core.inference.reader import TileReader
from casd_core.progress import Monitor
from casd_core.runtime import ThreadTuner
from casd_core.tiling import Tile, TileGrid, TilingConfig


@dataclass
class InferenceConfig:
    """How to run the model and label its output.

    ``batch_size`` tiles per forward pass; ``device`` "auto", "cpu", "cuda", "cuda:1", "mps";
    ``workers`` background reader threads (0 reads in the calling thread, without overlap;
    one is right almost always: every extra reader keeps its own dataset handle, and blocks
    that two readers touch are decoded twice). ``tta`` averages the 8 flips/rotations of each
    tile (8x the cost); ``min_score`` makes tiles whose calibrated top probability is lower
    abstain ("uncertain"); ``smooth`` averages overlapping windows onto the cells their edges
    make (see :mod:`casd_core.inference.labels`).
    """

    batch_size: int = 32
    device: str = "auto"
    workers: int = 1
    tta: bool = False
    min_score: float | None = None
    smooth: bool = False

    def validate(self) -> None:
        if self.batch_size < 1:
            raise CasdError(f"{param('batch_size')} {self.batch_size} must be at least 1")
        if self.workers < 0:
            raise CasdError(f"{param('workers')} {self.workers} must be 0 or more")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise CasdError(f"{param('min_score')} {self.min_score} must be a probability in [0, 1]")


def _batches(grid: TileGrid, size: int) -> Iterator[list[Tile]]:
    batch: list[Tile] = []
    for tile in grid:
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


class TileStream:
    """Iterator over the :class:`TilePrediction` of one raster (see the module doc).

    Counters (``total`` windows; ``labelled`` features, of which ``uncertain`` abstained;
    ``skipped_nodata`` windows) are filled while iterating. A
    raster whose tiles are all skipped raises :class:`CasdError` at the end, having yielded
    nothing.
    """

    def __init__(self, plan: RasterPlan, predictor: Predictor, inference: InferenceConfig,
                 monitor: Monitor) -> None:
        self.plan = plan
        self.predictor = predictor
        self.inference = inference
        self.monitor = monitor
        self.total = len(plan.grid)
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
        keep = np.flatnonzero(fractions <= self.plan.nodata_threshold)
        staged = None
        if len(keep):
            if self.plan.mapping is not None:
                raw = self.plan.mapping.apply(raw, band_axis=1)
            staged = self.predictor.stage(raw)
            if len(keep) < len(tiles):
                staged = staged[torch.from_numpy(keep)] if isinstance(staged, torch.Tensor) \
                    else staged[keep]
        return _LoadedBatch(tiles, fractions, keep, staged)

    def _loaded_batches(self, reader: TileReader) -> Iterator[_LoadedBatch]:
        """Batches in grid order; with workers, read ahead by at most ``workers + 1``."""
        workers = self.inference.workers
        batches = _batches(self.plan.grid, self.inference.batch_size)
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
        try:
            for batch in self._loaded_batches(reader):
                monitor.check_cancelled()
                tiles, fractions, keep = batch.tiles, batch.fractions, batch.keep
                self.skipped_nodata += len(tiles) - len(keep)
                if len(keep):
                    start = time.perf_counter()
                    probs = predictor.predict_staged(batch.staged, inference.tta)
                    tuner.record(len(keep), time.perf_counter() - start)
                    if averager is None:
                        places = [Placed(tiles[i].polygon, tiles[i].row, tiles[i].col, tiles[i].window,
                                         float(fractions[i])) for i in keep]
                        yield from self._labelled(probs, places)
                    else:
                        for j, i in enumerate(keep):
                            for cells, places in averager.add(tiles[i], probs[j].numpy(), float(fractions[i])):
                                yield from self._labelled(torch.from_numpy(cells), places)
                done += len(tiles)
                monitor.report("tiles", done, self.total,
                               rate=done / max(time.perf_counter() - began, 1e-9))
            if averager is not None:
                for cells, places in averager.finish():
                    yield from self._labelled(torch.from_numpy(cells), places)
            if self.labelled == 0:
                raise CasdError(
                    f"every tile of {plan.name} has more than {plan.nodata_threshold:.0%} nodata, so "
                    f"nothing was labelled; check the nodata value or raise {param('nodata_threshold')}")
        finally:
            reader.close()
            tuner.restore()
            if isinstance(previous_cache, int):
                set_gdal_config("GDAL_CACHEMAX", previous_cache)

    def _labelled(self, probabilities: torch.Tensor, places: list[Placed]) -> list[TilePrediction]:
        predictions = label(probabilities.float(), places, self.predictor.class_names,
                            self.predictor.name, self.inference.min_score)
        self.labelled += len(predictions)
        self.uncertain += sum(1 for p in predictions if p.class_id is None)
        return predictions


def iter_tile_predictions(raster_path: str | os.PathLike, predictor: Predictor,
                          tiling: TilingConfig | None = None,
                          inference: InferenceConfig | None = None,
                          monitor: Monitor | None = None,
                          radiometry: RadiometryConfig | None = None) -> TileStream:
    """Validate the raster and settings now (raising :class:`CasdError`), then stream
    predictions tile by tile, reading in the background while the model runs. A value
    mapping chosen for the raster is announced through ``monitor.warn``."""
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
    return TileStream(plan, predictor, inference, monitor)


def describe_values(plan: RasterPlan) -> dict[str, str]:
    """How a raster's values were treated, for the summary and the output layer's metadata."""
    return {"casd_stretch": plan.mapping.description if plan.mapping is not None else "none (raw values)",
            "casd_padding": (f"{plan.padding.fraction:.1%} of the raster (constant "
                             f"{'/'.join(f'{v:g}' for v in plan.padding.values)} at the border)"
                             if plan.padding is not None else "none")}



@dataclass
class RasterSummary:
    """What :func:`classify_raster` did."""

    raster: Path
    output: Path
    tiles: int
    labelled: int
    skipped_nodata: int
    features: int
    seconds: float
    class_counts: dict[str, int] = field(default_factory=dict)
    uncertain: int = 0
    values: dict[str, str] = field(default_factory=dict)  # describe_values()
    plan: RasterPlan | None = None  # what was decided about the raster before reading it

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def nodata_share(self) -> float:
        return self.skipped_nodata / self.tiles if self.tiles else 0.0

    @property
    def uncertain_share(self) -> float:
        return self.uncertain / self.labelled if self.labelled else 0.0


class _Counting:
    """Pass predictions through while counting classes (for the summary)."""

    def __init__(self, stream: TileStream) -> None:
        self.stream = stream
        self.counts: collections.Counter = collections.Counter()

    def __iter__(self) -> Iterator[TilePrediction]:
        for prediction in self.stream:
            self.counts[prediction.class_name] += 1
            yield prediction


def predictor_for(model: Any, device: str) -> Predictor:
    """A loaded :class:`Predictor` as is; a package, a path or ``None`` (the default) loaded."""
    if isinstance(model, Predictor):
        return model
    return Predictor.from_package(model, device)


def classify_raster(raster: str | os.PathLike, output: str | os.PathLike, model: Any = None,
                    tiling: TilingConfig | None = None, inference: InferenceConfig | None = None,
                    fmt: str | None = None, dissolve: bool = False,
                    monitor: Monitor | None = None,
                    radiometry: RadiometryConfig | None = None) -> RasterSummary:
    """Classify every tile of ``raster`` and write the labelled grid to ``output``.

    ``model``: a package path, a :class:`ModelPackage`, a loaded :class:`Predictor`, or
    ``None`` for the embedded default model. The output (format from ``fmt`` or its suffix)
    is replaced atomically; on any error or cancel no output file is written.
    """
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    inference.validate()
    tiling.validate()
    output = Path(output)
    key = vectorio.resolve_format(output, fmt)
    predictor = predictor_for(model, inference.device)
    start = time.perf_counter()
    stream = iter_tile_predictions(raster, predictor, tiling, inference, monitor, radiometry)
    vectorio.check_writable(output)  # after the cheap checks, before the long run
    counting = _Counting(stream)
    values = describe_values(stream.plan)
    try:
        features = vectorio.write_predictions(counting, output, stream.plan.crs, key,
                                              predictor.package, dissolve=dissolve, metadata=values)
    finally:
        stream.close()
    return RasterSummary(raster=Path(raster), output=output, tiles=stream.total,
                         labelled=stream.labelled, skipped_nodata=stream.skipped_nodata,
                         features=features, seconds=time.perf_counter() - start,
                         class_counts=dict(counting.counts.most_common()),
                         uncertain=stream.uncertain, values=values, plan=stream.plan)

