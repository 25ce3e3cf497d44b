"""Folders of rasters: one output per raster, resumable, a failure fails only its file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rasterio.errors import RasterioIOError

from casd_core import vectorio
from casd_core.atomic import remove_stale_partials
from casd_core.errors import Cancelled, CasdError, param, render_params
from casd_core.inference.pipeline import InferenceConfig, RasterSummary, classify_raster, predictor_for
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.progress import Monitor
from casd_core.tiling import TilingConfig

RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass
class FileResult:
    """One raster of a batch: ``status`` is "done", "skipped" (output existed) or "failed";
    ``details`` is what :func:`classify_raster` reported for a raster that was done, and
    ``message`` why one failed (settings named by key, see :func:`casd_core.errors.param`)."""

    raster: Path
    output: Path
    status: str
    details: RasterSummary | None = None
    seconds: float = 0.0
    message: str = ""

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
                    dissolve: bool = False, radiometry: RadiometryConfig | None = None) -> BatchSummary:
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
    remove_stale_partials(out_dir)
    summary = BatchSummary(folder=folder, out_dir=out_dir)
    n = len(rasters)
    for i, (raster, output) in enumerate(zip(rasters, outputs)):
        monitor.check_cancelled()
        label = str(raster.relative_to(folder))
        if output.exists() and not overwrite:
            summary.results.append(FileResult(raster, output, "skipped"))
            monitor.report("rasters", i + 1, n, item=label)
            continue
        file_monitor = monitor.part(i / n, 1 / n, item=label)
        start = time.perf_counter()
        try:
            result = classify_raster(raster, output, predictor, tiling, inference, key,
                                     dissolve, file_monitor, radiometry)
            summary.results.append(FileResult(raster, output, "done", result, result.seconds))
        except Cancelled:
            raise
        except CasdError as exc:
            summary.results.append(FileResult(raster, output, "failed",
                                              seconds=time.perf_counter() - start, message=exc.template))
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
    monitor.report("rasters", n, n)
    return summary
