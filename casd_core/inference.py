"""Classify every tile of a raster: the predictor and a bounded, overlapped pipeline.

Stages (each testable alone)::

    tile_grid (windows, row by row) ─► TileReader (background threads: windowed, resampled
    reads + nodata fraction) ─► bounded queue ─► Predictor (batched, inference mode) ─►
    TilePrediction stream ─► vectorio.write_predictions (atomic)

Reads: adjacent tiles of a grid row read 1:1 are fetched with one window read; resampled
tiles are read one by one with GDAL's resampling (average when shrinking, bilinear when
enlarging). (GDAL's multi-threaded block decoding, ``NUM_THREADS``, was tried: no gain in the
whole pipeline on 2 cores, 50-100 MB more memory.)

Memory does not grow with the raster: the grid is two offset arrays, at most
``workers + 1`` batches are read ahead, GDAL's block cache is capped to the block rows one
row of tiles spans, and predictions are kept as compact columns until the atomic write.

Nodata: a pixel is nodata when every selected band equals its nodata value (or is NaN), or
when the raster's mask/alpha says so. The fraction is measured on the resampled tile.
Tiles whose fraction exceeds ``TilingConfig.nodata_threshold`` are *skipped*: they are not
classified and not yielded (no feature is written for them), and are counted in
``TileStream.skipped_nodata``. Nodata pixels of the tiles that are classified are filled
with the band mean, i.e. 0 after normalisation.

CPU speed: the first :class:`Predictor` tells glibc's allocator to keep freed memory
(``mallopt``; see ``../shared/docs/ENVIRONMENT.md``: ~2.7× faster batched inference on CPU)
and never uses more threads than the process may use cores. OpenMP keeps its default wait
policy (threads spin briefly while they wait for each other: the fastest setting on an idle
machine), and :class:`ThreadTuner` falls back to one thread while another process wants the
cores, where a spinning team of threads runs 2-10× slower (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
import torch
from shapely.geometry import Polygon

from casd_core import vectorio
from casd_core.errors import Cancelled, CasdError
from casd_core.package import ModelPackage, default_model_path
from casd_core.progress import Monitor
from casd_core.runtime import prepare_cpu, resolve_device
from casd_core.tiling import Tile, TileGrid, TilingConfig, tile_grid

RASTER_SUFFIXES = (".tif", ".tiff")
# GDAL block cache: enough for the block rows one row of tiles spans, within these bounds.
_CACHE_MIN, _CACHE_MAX = 16 << 20, 256 << 20
# Rasters up to this many pixels are checked for being all nodata before any tile is read.
_EARLY_NODATA_CHECK_PIXELS = 2048 * 2048


@dataclass
class InferenceConfig:
    """How to run the model: tiles per batch, device ("auto", "cpu", "cuda", "cuda:1", "mps")
    and background reader threads (0 reads in the calling thread, without overlap). One
    reader is right almost always: every extra reader keeps its own dataset handle, and
    blocks that two readers touch are decoded twice (2 readers read slower than 1 here).
    """

    batch_size: int = 32
    device: str = "auto"
    workers: int = 1

    def validate(self) -> None:
        if self.batch_size < 1:
            raise CasdError(f"batch size {self.batch_size} must be at least 1")
        if self.workers < 0:
            raise CasdError(f"workers {self.workers} must be 0 or more")


class ThreadTuner:
    """Chooses, on CPU, between the threads torch was given and a single thread, by the
    model's measured speed, and re-checks now and then.

    OpenMP threads spin while they wait for each other at every layer: on an idle machine
    that is the fastest way to run (the benchmark's bound), but when another process needs
    a core, one preempted thread stalls the whole team and a batch runs 2-10× slower than on
    one thread. After a warm-up batch the full team is timed on ``probe`` batches, then one
    thread; the faster is kept (the other must win by 10%), and every ``period`` batches the
    other setting is timed again, so a run follows the machine's load. :meth:`restore` puts
    torch's thread count back.
    """

    def __init__(self, enabled: bool = True, period: int = 48, probe: int = 3) -> None:
        self.full = torch.get_num_threads()
        self.options = [self.full, 1] if enabled and self.full > 1 else [self.full]
        self.period, self.probe = period, probe
        self.rates: dict[int, float] = {}
        self.current = self.full
        self._batches = 0
        self._since_probe = 0
        self._window: list[tuple[int, float]] = []  # (tiles, seconds) at self.current

    def record(self, tiles: int, seconds: float) -> None:
        """Account one batch run at the current setting; switch setting when due."""
        self._batches += 1
        if len(self.options) == 1 or self._batches == 1:  # the first batch warms up
            return
        self._window.append((tiles, seconds))
        if len(self._window) < self.probe:
            return
        rate = sum(n for n, _ in self._window) / max(sum(t for _, t in self._window), 1e-9)
        self._window = []
        self.rates[self.current] = rate
        other = self.options[1] if self.current == self.options[0] else self.options[0]
        if other not in self.rates:
            self._use(other)  # first comparison
            return
        best = max(self.rates, key=self.rates.get)
        if best != self.current and self.rates[best] < 1.1 * self.rates[self.current]:
            best = self.current
        self._since_probe += self.probe
        if best != self.current:
            self._use(best)
        elif self._since_probe >= self.period:
            self._since_probe = 0
            del self.rates[other]  # stale: measure it again
            self._use(other)

    def _use(self, threads: int) -> None:
        self.current = threads
        torch.set_num_threads(threads)

    def restore(self) -> None:
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)


# --- predictor -------------------------------------------------------------------------------

class Predictor:
    """A loaded model package, ready to classify batches.

    ``predict`` takes a float batch (N, C, H, W) already in model units (scaled and
    normalised) and returns class probabilities (N, K) as float32 on the CPU.
    ``predict_raw`` takes raw pixel values (as read from the raster) and normalises them on
    the device. The pipeline splits that in two: :meth:`stage` on a reader thread, then
    :meth:`predict_staged` on the model's thread. Runs in ``torch.inference_mode``, in the
    channels_last memory format (faster here on CPU, and on CUDA), with float16 autocast on
    CUDA.
    """

    def __init__(self, package: ModelPackage, device: str = "auto",
                 name: str | None = None) -> None:
        self.package = package
        self.device = resolve_device(device)
        self.name = name or package.backbone
        prepare_cpu()
        model = package.build_model().to(self.device)
        self.channels_last = self.device.type in ("cpu", "cuda")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.autocast = self.device.type == "cuda"
        std = torch.tensor(package.std, dtype=torch.float32)
        mean = torch.tensor(package.mean, dtype=torch.float32)
        self._scale = (1.0 / (package.value_scale * std)).view(1, -1, 1, 1).to(self.device)
        self._offset = (mean / std).view(1, -1, 1, 1).to(self.device)

    @classmethod
    def from_package(cls, path_or_package: str | os.PathLike | ModelPackage | None,
                     device: str = "auto") -> "Predictor":
        """Load a package file (``None``: the embedded default model) or wrap a package."""
        if isinstance(path_or_package, ModelPackage):
            return cls(path_or_package, device)
        path = Path(path_or_package) if path_or_package is not None else default_model_path()
        if path_or_package is None and not path.is_file():
            raise CasdError(f"the default model {path} is missing; pass a model with -m "
                            "or reinstall casd")
        return cls(ModelPackage.load(path), device, name=path.stem)

    @property
    def class_names(self) -> list[str]:
        return self.package.class_names

    @property
    def input_size(self) -> int:
        return self.package.input_size

    def preprocess(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw pixel values (N, C, H, W) → float batch in model units, on the device."""
        if isinstance(raw, np.ndarray) and raw.dtype not in (np.uint8, np.float32):
            raw = raw.astype(np.float32)  # dtypes torch handles poorly (uint16, uint32, ...)
        x = torch.as_tensor(raw)
        if self.device.type == "cuda":
            x = x.pin_memory() if x.device.type == "cpu" else x
        x = x.to(self.device, non_blocking=True).float()
        return x.mul_(self._scale).sub_(self._offset)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu()

    @torch.inference_mode()
    def predict_raw(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.predict(self.preprocess(raw))

    def stage(self, raw: np.ndarray) -> np.ndarray | torch.Tensor:
        """The host-side part of preprocessing, safe on any thread.

        On CPU: the whole normalisation in numpy (one thread, overlapped with the model,
        instead of waking the model's threads for it): a float tensor in model units. On a
        GPU: nothing, so the batch travels as raw integers (4× less to copy for uint8).
        """
        if self.device.type != "cpu":
            return raw
        # Output in (N, H, W, C) memory, i.e. a channels_last tensor the model uses without
        # a layout copy; one long strided loop per band (a broadcast over the 3-long band
        # axis would make numpy's inner loop 3 elements long: ~4x slower).
        nhwc = raw.transpose(0, 2, 3, 1)
        x = np.empty(nhwc.shape, dtype=np.float32)
        for band in range(nhwc.shape[3]):
            np.multiply(nhwc[..., band], self._scale[0, band, 0, 0].item(), out=x[..., band],
                        casting="unsafe")
            np.subtract(x[..., band], self._offset[0, band, 0, 0].item(), out=x[..., band])
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    def predict_staged(self, staged: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Probabilities for the output of :meth:`stage`."""
        if isinstance(staged, torch.Tensor):
            return self.predict(staged)
        return self.predict_raw(staged)


# --- reading ---------------------------------------------------------------------------------

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
        raise CasdError(f"{path} is a folder, not a raster; use `casd batch` for folders")
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
            raise CasdError(f"--bands lists {len(requested)} band(s) but the model expects {need} "
                            f"({wanted}); give {need} band numbers, e.g. "
                            f"--bands {','.join(str(i + 1) for i in range(need))}")
        missing = [b for b in requested if b > dataset.count]
        if missing:
            raise CasdError(f"band {missing[0]} does not exist: {name} has {dataset.count} "
                            f"band(s); pick --bands between 1 and {dataset.count}")
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


def plan_raster(raster: str | os.PathLike, package: ModelPackage,
                tiling: TilingConfig) -> RasterPlan:
    """Validate a raster against a package and tiling; raise one clear CasdError if unfit."""
    tiling.validate()
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
        fill = np.array([m * package.value_scale for m in package.mean], dtype=np.float64)
        if np.dtype(dtype).kind in "ui":
            info = np.iinfo(dtype)
            fill = np.clip(np.round(fill), info.min, info.max)
        fill = fill.astype(dtype)
        block_h = dataset.block_shapes[0][0] if dataset.block_shapes else 256
        span = int(grid.region.width) * (tile_h + 2 * block_h) * dataset.count \
            * np.dtype(dtype).itemsize
        plan = RasterPlan(path=path, grid=grid, bands=bands, out_shape=out_shape,
                          resampling=resampling, mask_mode=mask_mode, nodata=nodata,
                          fill=fill, dtype=dtype, crs=dataset.crs,
                          cache_bytes=int(min(max(span, _CACHE_MIN), _CACHE_MAX)),
                          nodata_threshold=tiling.nodata_threshold)
        if _region_all_nodata(dataset, plan):
            raise CasdError(f"{name} holds only nodata in the area to classify; check its "
                            "nodata value or the extent/AOI")
    return plan


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
    return bool(_nodata_mask(data, plan, masks).all())


def _nodata_mask(data: np.ndarray, plan: RasterPlan, mask: np.ndarray | None) -> np.ndarray:
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
        if plan.mask_mode == "none" and out.dtype.kind != "f":
            return out, fractions
        for i, tile in enumerate(tiles):
            mask = None
            if plan.mask_mode == "mask":
                mask = dataset.read_masks(plan.bands[0], window=tile.window,
                                          out_shape=(height, width),
                                          resampling=Resampling.nearest)
            invalid = _nodata_mask(out[i], plan, mask)
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


# --- predictions -----------------------------------------------------------------------------

@dataclass
class TilePrediction:
    """One classified tile: its ground polygon (raster CRS) and the output fields."""

    geometry: Polygon
    row: int
    col: int
    window: Window
    class_id: int
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


def _batches(grid: TileGrid, size: int) -> Iterator[list[Tile]]:
    batch: list[Tile] = []
    for tile in grid:
        batch.append(tile)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tile_progress_message(done: int, total: int) -> str:
    """The progress text the pipeline reports; :func:`parse_tile_progress` reads it back."""
    return f"{done}/{total} tiles"


def parse_tile_progress(message: str) -> tuple[int, int] | None:
    head = message.rsplit(" tiles", 1)[0].rsplit(" ", 1)[-1] if message.endswith(" tiles") else ""
    done, _, total = head.partition("/")
    return (int(done), int(total)) if done.isdigit() and total.isdigit() else None


@dataclass
class _LoadedBatch:
    tiles: list[Tile]
    fractions: np.ndarray
    keep: np.ndarray  # indexes of the tiles to classify
    staged: np.ndarray | torch.Tensor | None


class TileStream:
    """Iterator over the :class:`TilePrediction` of one raster (see the module doc).

    Counters (``total``, ``labelled``, ``skipped_nodata``) are filled while iterating. A
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
        plan, predictor, monitor = self.plan, self.predictor, self.monitor
        names = predictor.class_names
        k = min(3, len(names))
        log_k = math.log(len(names)) if len(names) > 1 else 1.0
        threshold = plan.nodata_threshold
        reader = TileReader(plan)
        done = 0
        monitor.progress(0.0, tile_progress_message(0, self.total))
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
                    probs = predictor.predict_staged(batch.staged)
                    tuner.record(len(keep), time.perf_counter() - start)
                    top_p, top_i = torch.topk(probs, k, dim=1)
                    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / log_k
                    top_p, top_i = top_p.tolist(), top_i.tolist()
                    entropy = entropy.tolist()
                    for j, index in enumerate(keep):
                        tile = tiles[index]
                        p, c = top_p[j], top_i[j]
                        second = p[1] if k > 1 else 0.0
                        yield TilePrediction(
                            geometry=tile.polygon, row=tile.row, col=tile.col, window=tile.window,
                            class_id=c[0], class_name=names[c[0]], score=p[0],
                            margin=p[0] - second, entropy=max(0.0, entropy[j]),
                            top1_class=names[c[0]], top1_prob=p[0],
                            top2_class=names[c[1]] if k > 1 else None,
                            top2_prob=p[1] if k > 1 else None,
                            top3_class=names[c[2]] if k > 2 else None,
                            top3_prob=p[2] if k > 2 else None,
                            nodata_fraction=float(fractions[index]), model=predictor.name)
                        self.labelled += 1
                done += len(tiles)
                monitor.progress(done / max(self.total, 1), tile_progress_message(done, self.total))
            if self.labelled == 0:
                raise CasdError(
                    f"every tile of {plan.name} has more than {threshold:.0%} nodata, so nothing "
                    "was labelled; check the nodata value or raise --nodata-threshold")
        finally:
            reader.close()
            tuner.restore()
            if isinstance(previous_cache, int):
                set_gdal_config("GDAL_CACHEMAX", previous_cache)


def iter_tile_predictions(raster_path: str | os.PathLike, predictor: Predictor,
                          tiling: TilingConfig | None = None,
                          inference: InferenceConfig | None = None,
                          monitor: Monitor | None = None) -> TileStream:
    """Validate the raster and settings now (raising :class:`CasdError`), then stream
    predictions tile by tile, reading in the background while the model runs."""
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    inference.validate()
    plan = plan_raster(raster_path, predictor.package, tiling)
    return TileStream(plan, predictor, inference, monitor or Monitor())


# --- one raster ------------------------------------------------------------------------------

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

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


class _Counting:
    """Pass predictions through while counting classes (for the summary)."""

    def __init__(self, stream: TileStream) -> None:
        self.stream = stream
        self.counts: collections.Counter = collections.Counter()

    def __iter__(self) -> Iterator[TilePrediction]:
        for prediction in self.stream:
            self.counts[prediction.class_name] += 1
            yield prediction


def _predictor_for(model: Any, device: str) -> Predictor:
    if isinstance(model, Predictor):
        return model
    return Predictor.from_package(model, device)


def classify_raster(raster: str | os.PathLike, output: str | os.PathLike, model: Any = None,
                    tiling: TilingConfig | None = None, inference: InferenceConfig | None = None,
                    fmt: str | None = None, dissolve: bool = False,
                    monitor: Monitor | None = None) -> RasterSummary:
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
    predictor = _predictor_for(model, inference.device)
    start = time.perf_counter()
    stream = iter_tile_predictions(raster, predictor, tiling, inference, monitor)
    vectorio.check_writable(output)  # after the cheap checks, before the long run
    counting = _Counting(stream)
    try:
        features = vectorio.write_predictions(counting, output, stream.plan.crs, key,
                                              predictor.package, dissolve=dissolve)
    finally:
        stream.close()
    return RasterSummary(raster=Path(raster), output=output, tiles=stream.total,
                         labelled=stream.labelled, skipped_nodata=stream.skipped_nodata,
                         features=features, seconds=time.perf_counter() - start,
                         class_counts=dict(counting.counts.most_common()))


# --- a folder --------------------------------------------------------------------------------

@dataclass
class FileResult:
    """One raster of a batch: ``status`` is "done", "skipped" (output existed) or "failed"."""

    raster: Path
    output: Path
    status: str
    tiles: int = 0
    labelled: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class BatchSummary:
    """What :func:`classify_folder` did, per file."""

    folder: Path
    out_dir: Path
    results: list[FileResult] = field(default_factory=list)
    merged: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def table(self) -> str:
        """A plain-text table: one row per raster, then totals."""
        rows = [("raster", "status", "tiles", "labelled", "seconds", "output / message")]
        for r in self.results:
            try:
                shown = r.raster.relative_to(self.folder)
            except ValueError:
                shown = r.raster
            detail = r.message if r.status == "failed" else str(r.output)
            rows.append((str(shown), r.status, str(r.tiles) if r.tiles else "-",
                         str(r.labelled) if r.labelled else "-",
                         f"{r.seconds:.1f}" if r.seconds else "-", detail))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5]
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 16)
        totals = (f"{len(self.results)} raster(s): {self.count('done')} done, "
                  f"{self.count('skipped')} skipped (already done), {self.failed} failed")
        if self.merged is not None:
            totals += f"; merged layer: {self.merged}"
        return "\n".join(lines + ["", totals])


def find_rasters(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """``*.tif``/``*.tiff`` (any case) under ``folder``, sorted, hidden files excluded."""
    folder = Path(folder)
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    found = [p for p in pattern
             if p.suffix.lower() in RASTER_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found)


def output_path_for(raster: Path, folder: Path, out_dir: Path, fmt: str) -> Path:
    """Output of one raster: its path relative to the folder, under out_dir, new suffix
    (sub-folders are mirrored, so a/x.tif and b/x.tif cannot collide)."""
    relative = raster.relative_to(folder)
    return (out_dir / relative).with_suffix(vectorio.FORMATS[fmt][1])


def classify_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, model: Any = None,
                    tiling: TilingConfig | None = None, inference: InferenceConfig | None = None,
                    recursive: bool = True, overwrite: bool = False, merged: bool = False,
                    fmt: str = "gpkg", monitor: Monitor | None = None,
                    dissolve: bool = False) -> BatchSummary:
    """Classify every raster of a folder into ``out_dir``: one output per raster.

    Loads the model once. Resumable: a raster whose output exists is skipped unless
    ``overwrite`` (outputs are written atomically, so an existing one is complete, and a run
    killed half-way and restarted ends with exactly one output per raster). A raster that
    fails is reported in the summary and the batch goes on; a cancel stops it. ``merged``
    also writes ``merged.<fmt>`` over all outputs with a ``source`` field.
    """
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    monitor = monitor or Monitor()
    tiling.validate()
    inference.validate()
    folder, out_dir = Path(folder), Path(out_dir)
    key = vectorio.resolve_format(f"x.{fmt}", fmt)
    if not folder.is_dir():
        raise CasdError(f"folder {folder} does not exist or is not a folder; check the path")
    rasters = find_rasters(folder, recursive)
    if not rasters:
        raise CasdError(f"no .tif/.tiff raster found in {folder}"
                        f"{' or its sub-folders' if recursive else ''}; check the folder")
    vectorio.check_writable(out_dir / f"probe{vectorio.FORMATS[key][1]}")
    merged_path = out_dir / f"merged{vectorio.FORMATS[key][1]}"
    outputs = [output_path_for(r, folder, out_dir, key) for r in rasters]
    if merged and merged_path in outputs:
        raise CasdError(f"a raster's output would be named {merged_path.name}, like the merged "
                        "layer; rename that raster or leave out --merged")
    predictor = _predictor_for(model, inference.device)
    vectorio.remove_stale_partials(out_dir)
    summary = BatchSummary(folder=folder, out_dir=out_dir)
    n = len(rasters)
    for i, (raster, output) in enumerate(zip(rasters, outputs)):
        monitor.check_cancelled()
        label = str(raster.relative_to(folder))
        if output.exists() and not overwrite:
            summary.results.append(FileResult(raster, output, "skipped"))
            monitor.progress((i + 1) / n, f"{label}: already done")
            continue
        file_monitor = Monitor(
            on_progress=lambda f, msg, i=i, label=label: monitor.progress((i + f) / n, f"{label}: {msg}"),
            is_cancelled=monitor.is_cancelled)
        start = time.perf_counter()
        try:
            result = classify_raster(raster, output, predictor, tiling, inference, key,
                                     dissolve, file_monitor)
            summary.results.append(FileResult(raster, output, "done", result.tiles,
                                              result.labelled, result.seconds))
        except Cancelled:
            raise
        except CasdError as exc:
            summary.results.append(FileResult(raster, output, "failed",
                                              seconds=time.perf_counter() - start, message=str(exc)))
        except (RasterioIOError, OSError, ValueError, RuntimeError) as exc:
            # A file that opened fine but broke mid-read (corrupt block, vanished disk).
            summary.results.append(FileResult(raster, output, "failed",
                                              seconds=time.perf_counter() - start,
                                              message=f"{type(exc).__name__}: {exc}".split("\n")[0]))
    if merged:
        sources = [(str(r.raster.relative_to(folder)), r.output) for r in summary.results
                   if r.status in ("done", "skipped")]
        if sources:
            vectorio.merge_layers(sources, merged_path, key, predictor.package)
            summary.merged = merged_path
    monitor.progress(1.0, f"{n} raster(s) processed")
    return summary
