"""Reading tiles: batches of windows as raw arrays plus each tile's nodata fraction.

Adjacent tiles of a grid row read 1:1 are fetched with one window read; resampled tiles are
read one by one with GDAL's resampling (average when shrinking, bilinear when enlarging).
(GDAL's multi-threaded block decoding, ``NUM_THREADS``, was tried: no gain in the whole
pipeline on 2 cores, 50-100 MB more memory.) Nodata pixels of a tile are filled with the
band mean, i.e. 0 after normalisation.

:class:`TileReader` serves reader threads (the CPU path: one reader keeps up with the model
on a few cores). :class:`ProcessTileReader` feeds a GPU from several forked processes
instead: decoding holds the GIL in places, so threads stop scaling after a core or two, and
each process keeps its own dataset handle. They read into shared slots, which the GPU path
registers as pinned memory (``gpu_feed.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
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

    def read(self, tiles: list[Tile], base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``base``: (N, H, W, C) memory of the plan's dtype to read into (a shared slot)."""
        plan = self.plan
        dataset = self._dataset()
        height, width = plan.out_shape
        # Pixel-interleaved memory seen as (N, C, H, W): GDAL decodes interleaved pixels and
        # the model runs channels_last, so no layout change happens anywhere on the way.
        if base is None:
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



_PR_SET_PDEATHSIG = 1
# A reader process's answer: (batch number, slot, nodata fractions or None, error or None).
_Answer = tuple[int, int, "np.ndarray | None", "tuple[bool, str] | None"]


class ProcessTileReader:
    """Reads batches of tiles in ``processes`` forked child processes, each with its own
    dataset handle, into ``slots`` shared (N, H, W, C) buffers of ``batch_size`` tiles.

    The plan's value mapping is applied in the child, so a slot holds what the predictor
    stages (the plan's dtype, or the mapping's output type when values are mapped). Fork, not spawn: the
    children start at once, without re-importing anything, and inherit the slots (anonymous
    shared memory, not ``/dev/shm``, whose size containers often limit); they never touch
    the GPU. :func:`available` says whether this platform can fork.
    """

    def __init__(self, plan: RasterPlan, batch_size: int, processes: int, slots: int) -> None:
        self.plan = plan
        height, width = plan.out_shape
        shape = (batch_size, height, width, len(plan.bands))
        dtype = np.dtype(plan.dtype)
        if plan.mapping is not None:  # whatever the mapping makes, as the thread path has it
            dtype = plan.mapping.apply(np.zeros((1, len(plan.bands), 1, 1), dtype), band_axis=1).dtype
        size = int(np.prod(shape)) * dtype.itemsize
        self._maps = [mmap.mmap(-1, size) for _ in range(slots)]
        self.slots = [np.ndarray(shape, dtype=dtype, buffer=m) for m in self._maps]
        context = multiprocessing.get_context("fork")
        self._tasks = [context.SimpleQueue() for _ in range(processes)]
        self._answers = context.Queue()
        self._processes = [context.Process(target=_serve, args=(plan, self.slots, tasks, self._answers,
                                                                os.getpid()),
                                           name=f"casd-read-{i}", daemon=True)
                           for i, tasks in enumerate(self._tasks)]
        for process in self._processes:
            process.start()

    @staticmethod
    def available() -> bool:
        return "fork" in multiprocessing.get_all_start_methods()

    def batches(self, batches: Iterable[list[Tile]]
                ) -> Iterator[tuple[list[Tile], np.ndarray, np.ndarray, Callable[[], None]]]:
        """(tiles, values (N, C, H, W) in a slot, nodata fractions, release) in grid order,
        reading ahead into every free slot; ``release()`` hands the slot back once its
        values are used (copied to the GPU, or staged)."""
        free = list(range(len(self.slots)))
        sent: dict[int, list[Tile]] = {}
        arrived: dict[int, tuple[int, np.ndarray]] = {}
        source = iter(batches)
        submitted = wanted = 0
        exhausted = False
        while True:
            while free and not exhausted:
                tiles = next(source, None)
                if tiles is None:
                    exhausted = True
                    break
                slot = free.pop()
                self._tasks[submitted % len(self._tasks)].put((submitted, slot, tiles))
                sent[submitted] = tiles
                submitted += 1
            if wanted == submitted:
                if exhausted:
                    return
                raise RuntimeError("every reader slot is held by the caller; release them as they are used")
            while wanted not in arrived:
                number, slot, fractions, error = self._answer()
                if error is not None:
                    is_user_error, message = error
                    raise CasdError(message) if is_user_error else RuntimeError(message)
                arrived[number] = (slot, fractions)
            slot, fractions = arrived.pop(wanted)
            tiles = sent.pop(wanted)
            values = self.slots[slot][:len(tiles)].transpose(0, 3, 1, 2)
            yield tiles, values, fractions, (lambda slot=slot: free.append(slot))
            wanted += 1

    def _answer(self) -> _Answer:
        while True:
            try:
                return self._answers.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._processes if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"a tile reader process of {self.plan.name} died "
                                       f"(exit code {dead[0].exitcode})") from None

    def close(self) -> None:
        for tasks, process in zip(self._tasks, self._processes):
            if process.is_alive():
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self._answers.close()
        # The shared memory goes with the last view of it (a batch may still hold one).
        self.slots, self._maps = [], []


def _serve(plan: RasterPlan, slots: list[np.ndarray], tasks: Any, answers: Any, parent: int) -> None:
    """A reader process: read each batch asked for into its slot, answer with the fractions."""
    from rasterio.env import set_gdal_config

    # Die with the parent, even a SIGKILLed one: the child holds both ends of its task pipe,
    # so it would otherwise wait for tasks forever.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    set_gdal_config("GDAL_CACHEMAX", plan.cache_bytes)
    reader = TileReader(plan)
    try:
        while (task := tasks.get()) is not None:
            number, slot, tiles = task
            target = slots[slot][:len(tiles)]
            try:
                if plan.mapping is None:
                    _, fractions = reader.read(tiles, target)
                else:
                    raw, fractions = reader.read(tiles)
                    target[...] = plan.mapping.apply(raw, band_axis=1).transpose(0, 2, 3, 1)
                answers.put((number, slot, fractions, None))
            except CasdError as exc:
                answers.put((number, slot, None, (True, exc.template)))
            except (RasterioIOError, OSError, ValueError, RuntimeError) as exc:
                answers.put((number, slot, None, (False, f"{type(exc).__name__}: {exc}".split("\n")[0])))
    finally:
        reader.close()
