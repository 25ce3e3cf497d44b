"""Folders of rasters: one output per raster, resumable, a failure fails only its file.

Under ``torchrun`` (a process group is active) the rasters still to do are shared out across
the ranks by pixel count; each rank classifies its own on its own device, and rank 0 writes
the summary (``summary.json``) and the merged layer once every rank is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import rasterio
from rasterio.errors import RasterioError, RasterioIOError

from casd_core import vectorio
from casd_core.atomic import remove_stale_partials, write_text_atomic
from casd_core.errors import Cancelled, CasdError, param, render_params
from casd_core.inference.classify import RasterSummary, active_process_group, classify_raster, predictor_for
from casd_core.inference.pipeline import InferenceConfig
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.progress import Monitor
from casd_core.tiling import TilingConfig

RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass
class FileResult:
    """One raster of a batch: ``status`` is "done", "skipped" (output existed) or "failed";
    ``details`` is what :func:`classify_raster` reported for a raster that was done, and
    ``message`` why one failed (settings named by key, see :func:`casd_core.errors.param`);
    ``rank`` the process that classified it (0 in a single process, and for skipped ones)."""

    raster: Path
    output: Path
    status: str
    details: RasterSummary | None = None
    seconds: float = 0.0
    message: str = ""
    rank: int = 0
    pixels: int = 0

    @property
    def tiles(self) -> int:
        return self.details.tiles if self.details else 0

    @property
    def labelled(self) -> int:
        return self.details.labelled if self.details else 0


@dataclass
class BatchSummary:
    """What :func:`classify_folder` did, per file."""

    folder: Path
    out_dir: Path
    results: list[FileResult] = field(default_factory=list)
    merged: Path | None = None
    world_size: int = 1

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def table(self, name_of: Callable[[str], str] | None = None) -> str:
        """A plain-text table, one row per raster (tiles, labelled features, share of tiles
        skipped as nodata, share of features uncertain, the stretch applied), then totals.
        ``name_of`` names settings in failure messages as the reader's front end does."""
        header = ("raster", "status", "tiles", "labelled", "nodata", "uncertain", "seconds", "stretch")
        rows = [(*header, "output / message")]
        for r in self.results:
            try:
                shown = r.raster.relative_to(self.folder)
            except ValueError:
                shown = r.raster
            d = r.details
            detail = render_params(r.message, name_of) if r.status == "failed" else str(r.output)
            rows.append((str(shown), r.status, str(d.tiles) if d else "-", str(d.labelled) if d else "-",
                         f"{d.nodata_share:.0%}" if d else "-", f"{d.uncertain_share:.0%}" if d else "-",
                         f"{r.seconds:.1f}" if r.seconds else "-",
                         d.values.get("casd_stretch", "-").split(" (")[0] if d else "-", detail))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 16)
        totals = (f"{len(self.results)} raster(s): {self.count('done')} done, "
                  f"{self.count('skipped')} skipped (already done), {self.failed} failed")
        if self.merged is not None:
            totals += f"; merged layer: {self.merged}"
        return "\n".join(lines + ["", totals])

    def to_json(self) -> dict[str, Any]:
        """``summary.json``: every raster once, its status, tile counts and the rank that did
        it; paths relative to the folder and the output folder."""
        def relative(path: Path, root: Path) -> str:
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                return str(path)

        rasters = []
        for r in self.results:
            d = r.details
            rasters.append({
                "raster": relative(r.raster, self.folder), "output": relative(r.output, self.out_dir),
                "status": r.status, "rank": r.rank, "pixels": r.pixels,
                "tiles": d.tiles if d else None, "labelled": d.labelled if d else None,
                "skipped_nodata": d.skipped_nodata if d else None, "uncertain": d.uncertain if d else None,
                "features": d.features if d else None, "seconds": round(r.seconds, 3),
                "message": render_params(r.message, None) if r.status == "failed" else ""})
        return {"folder": str(self.folder), "out_dir": str(self.out_dir), "world_size": self.world_size,
                "counts": {s: self.count(s) for s in ("done", "skipped", "failed")},
                "merged": relative(self.merged, self.out_dir) if self.merged else None,
                "rasters": rasters}


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


SUMMARY_NAME = "summary.json"


def raster_pixels(path: Path) -> int:
    """Width × height of a raster, the work it stands for when rasters are shared out; 0 for a
    file that does not open (it fails fast wherever it lands)."""
    try:
        with rasterio.open(path) as dataset:
            return dataset.width * dataset.height
    except (RasterioError, OSError):
        return 0


def share_by_pixels(pixels: list[int], ranks: int) -> list[int]:
    """The rank for each item: largest first onto the least-loaded rank (ties: the earlier
    item first, the lower rank), so every rank computes the same answer."""
    owners = [0] * len(pixels)
    load = [0] * ranks
    for i in sorted(range(len(pixels)), key=lambda i: (-pixels[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += pixels[i]
    return owners


def classify_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, model: Any = None,
                    tiling: TilingConfig | None = None, inference: InferenceConfig | None = None,
                    recursive: bool = True, overwrite: bool = False, merged: bool = False,
                    fmt: str = "gpkg", monitor: Monitor | None = None,
                    dissolve: bool = False, radiometry: RadiometryConfig | None = None) -> BatchSummary:
    """Classify every raster of a folder into ``out_dir``: one output per raster, and
    ``summary.json`` (written atomically) saying what happened to each.

    Loads the model once. Resumable: a raster whose output exists is skipped unless
    ``overwrite`` (outputs are written atomically, so an existing one is complete, and a run
    killed half-way and restarted ends with exactly one output per raster). A raster that
    fails is reported in the summary and the batch goes on; a cancel stops it. ``merged``
    also writes ``merged.<fmt>`` over all outputs with a ``source`` field.

    With an active process group (``torchrun``), every rank calls this with the same
    arguments: rank 0 sweeps dead writers' partial files and shares the rasters still to do
    out by pixel count (:func:`share_by_pixels`), each rank classifies its share with its own
    ``model``, and rank 0 alone writes the merged layer and ``summary.json`` after all are
    done. Rank 0 returns the whole summary, the other ranks their own rows.
    """
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    monitor = monitor or Monitor()
    radiometry = radiometry or RadiometryConfig()
    tiling.validate()
    inference.validate()
    radiometry.validate()
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
                        f"layer; rename that raster or leave out {param('merged')}")
    predictor = predictor_for(model, inference.device)
    distributed = active_process_group()
    rank, ranks = (distributed.rank(), distributed.world_size()) if distributed else (0, 1)
    with distributed.patient_group() if distributed else contextlib.nullcontext() as group:
        # One rank decides, before anyone writes: every rank then works from the same list.
        plan = None
        if rank == 0:
            remove_stale_partials(out_dir)
            plan = _share(rasters, outputs, overwrite, ranks)
        owners, pixels = distributed.broadcast_object_on(group, plan) if distributed else plan
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        results = _classify_files(mine, rasters, outputs, pixels, folder, predictor, tiling,
                                  inference, key, dissolve, monitor, radiometry, rank)
        rows = [(i, _portable(r)) for i, r in results]
        gathered = distributed.gather_object_on(group, rows) if distributed else [rows]
    summary = BatchSummary(folder=folder, out_dir=out_dir, world_size=ranks)
    if rank != 0:
        summary.results = [r for _, r in results]
        return summary
    done = {i: r for rows in gathered for i, r in rows}
    for i, (raster, output) in enumerate(zip(rasters, outputs)):
        summary.results.append(done.get(i) or FileResult(raster, output, "skipped", pixels=pixels[i]))
    if merged:
        sources = [(str(r.raster.relative_to(folder)), r.output) for r in summary.results
                   if r.status in ("done", "skipped")]
        if sources:
            vectorio.merge_layers(sources, merged_path, key, predictor.package)
            summary.merged = merged_path
    write_text_atomic(json.dumps(summary.to_json(), indent=1) + "\n", out_dir / SUMMARY_NAME)
    monitor.report("rasters", len(rasters), len(rasters))
    return summary


def _share(rasters: list[Path], outputs: list[Path], overwrite: bool,
           ranks: int) -> tuple[list[int], list[int]]:
    """(owner rank per raster, -1 for one already done; pixels per raster)."""
    todo = [i for i, output in enumerate(outputs) if overwrite or not output.exists()]
    pixels = [0] * len(rasters)
    for i in todo:
        pixels[i] = raster_pixels(rasters[i])
    owners = [-1] * len(rasters)
    for i, owner in zip(todo, share_by_pixels([pixels[i] for i in todo], ranks)):
        owners[i] = owner
    return owners, pixels


def _classify_files(mine: list[int], rasters: list[Path], outputs: list[Path], pixels: list[int],
                    folder: Path, predictor: Any, tiling: TilingConfig, inference: InferenceConfig,
                    key: str, dissolve: bool, monitor: Monitor, radiometry: RadiometryConfig,
                    rank: int) -> list[tuple[int, FileResult]]:
    """This rank's rasters, in folder order; a failure is recorded and the next one goes on."""
    results = []
    n = len(mine)
    for k, i in enumerate(mine):
        monitor.check_cancelled()
        raster, output = rasters[i], outputs[i]
        label = str(raster.relative_to(folder))
        file_monitor = monitor.part(k / n, 1 / n, item=label)
        start = time.perf_counter()
        try:
            result = classify_raster(raster, output, predictor, tiling, inference, key,
                                     dissolve, file_monitor, radiometry)
            results.append((i, FileResult(raster, output, "done", result, result.seconds,
                                          rank=rank, pixels=pixels[i])))
        except Cancelled:
            raise
        except CasdError as exc:
            results.append((i, FileResult(raster, output, "failed", seconds=time.perf_counter() - start,
                                          message=exc.template, rank=rank, pixels=pixels[i])))
        except (RasterioIOError, OSError, ValueError, RuntimeError) as exc:
            # A file that opened fine but broke mid-read (corrupt block, vanished disk).
            results.append((i, FileResult(raster, output, "failed", seconds=time.perf_counter() - start,
                                          message=f"{type(exc).__name__}: {exc}".split("\n")[0],
                                          rank=rank, pixels=pixels[i])))
    return results


def _portable(result: FileResult) -> FileResult:
    """The row without its raster plan (grid, masks: heavy, and only rank-local use)."""
    if result.details is None:
        return result
    return dataclasses.replace(result, details=dataclasses.replace(result.details, plan=None))
