"""``casd predict`` and ``casd batch``: label rasters tile by tile."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from casd_core.cli.common import add_command, default_of, name_of_flag, parse_bands
from casd_core.errors import CasdError, param
from casd_core.inference import InferenceConfig
from casd_core.inference.radiometry import STRETCHES, RadiometryConfig, parse_value_range
from casd_core.progress import ProgressEvent
from casd_core.tiling import TilingConfig


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "predict", _run_predict, "label a raster tile by tile and write the grid as a vector layer",
        "Slide a window over a georeferenced raster, classify each tile and write one "
        "polygon per tile (class, score, uncertainty, top-3) in the raster's CRS, styled "
        "for QGIS. The output is written atomically: an interrupted run leaves no file.")
    p.add_argument("raster", type=Path, help="georeferenced raster (GeoTIFF, ...)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output layer: .gpkg (default format), .geojson or .fgb")
    p.add_argument("--format", choices=["gpkg", "geojson", "fgb"],
                   help="output format (default: from the output's suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--preview", type=Path, metavar="PNG",
                   help="also draw the labelled grid over the raster, with a legend, into this PNG")
    p.add_argument("--raster-out", type=Path, metavar="TIF",
                   help="also write a class-id GeoTIFF, one pixel per tile, with class colours and names")
    p.add_argument("--suggest", type=int, metavar="N",
                   help="also write OUTPUT's stem + _suggestions: the N tiles the model is least sure of, "
                        "spread out, with an empty class field to label (for casd chips --labels)")
    _add_inference_arguments(p)


def add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "batch", _run_batch, "label every raster of a folder (resumable)",
        "Run `casd predict` over every *.tif/*.tiff of a folder (recursively), one output "
        "per raster under OUTDIR (sub-folders mirrored). Rasters whose output exists are "
        "skipped, so rerunning after an interruption resumes. A raster that fails is "
        "reported and the batch goes on; the exit code is 1 if any failed.")
    p.add_argument("folder", type=Path, help="folder of rasters")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                   help="output folder (created if needed)")
    p.add_argument("--format", choices=["gpkg", "geojson", "fgb"], default="gpkg", help="output format")
    p.add_argument("--overwrite", action="store_true", help="redo rasters whose output exists")
    p.add_argument("--no-recursive", action="store_true", help="only the folder itself, not sub-folders")
    p.add_argument("--merged", action="store_true",
                   help="also write OUTDIR/merged.<format>: every tile of every raster, with a 'source' field")
    _add_inference_arguments(p)


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    tiling, run = (lambda name: default_of(TilingConfig, name)), (lambda name: default_of(InferenceConfig, name))
    p.add_argument("-m", "--model", type=Path,
                   help="model package (.safetensors); default: the embedded AID model")
    t = p.add_argument_group("tiling")
    t.add_argument("--tile-size", type=float,
                   help="tile size in --unit; default: the model's recommended ground footprint")
    t.add_argument("--unit", choices=["m", "px"], default=tiling("unit"),
                   help="unit of --tile-size and --stride: metres on the ground or raster pixels")
    t.add_argument("--overlap", type=float, default=tiling("overlap"),
                   help="overlap between tiles, fraction of a tile")
    t.add_argument("--stride", type=float, help="step between tiles in --unit (overrides --overlap)")
    t.add_argument("--nodata-threshold", type=float, default=tiling("nodata_threshold"),
                   help="tiles with a larger nodata fraction get no label")
    t.add_argument("--bands", help="raster bands (1-based) in the model's band order, e.g. 1,2,3; "
                                   "default: by colour interpretation, else the first ones")
    t.add_argument("--extent", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="only this rectangle, in the raster's CRS")
    t.add_argument("--aoi", type=Path, help="only tiles overlapping the polygons of this vector file")
    t.add_argument("--dissolve", action="store_true",
                   help="merge adjacent tiles of the same class into region polygons")
    values = (lambda name: default_of(RadiometryConfig, name))
    v = p.add_argument_group("pixel values and nodata")
    v.add_argument("--stretch", choices=list(STRETCHES), default=values("stretch"),
                   help="auto: feed values that fit the model raw and map others with one gain "
                        "(see docs); none: raw; percentile: per-band cumulative cut; minmax: per band")
    v.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   default=list(values("percentiles")), help="the cut of --stretch percentile, in %%")
    v.add_argument("--value-range", nargs=2, metavar=("MIN", "MAX"),
                   help="map MIN..MAX linearly onto the model's range (overrides --stretch); one "
                        "value, or one per band: --value-range 0,0,0 3000,3200,2800")
    v.add_argument("--nodata", type=float,
                   help="a value that marks nodata in every band (default: the raster's own flag)")
    v.add_argument("--auto-nodata", action=argparse.BooleanOptionalAction, default=values("auto_nodata"),
                   help="without a nodata flag, treat constant 0/255 regions at the border as nodata")
    lab = p.add_argument_group("labels")
    lab.add_argument("--min-score", type=float,
                     help="tiles whose calibrated top probability is lower get no class ('uncertain')")
    lab.add_argument("--tta", action="store_true",
                     help="average the 8 flips and 90° rotations of each tile (8x slower)")
    lab.add_argument("--smooth", action="store_true",
                     help="with --overlap: average overlapping windows onto non-overlapping cells")
    r = p.add_argument_group("hardware")
    r.add_argument("--batch-size", type=int, default=run("batch_size"), help="tiles per model call")
    r.add_argument("--device", default=run("device"), help="auto (CUDA when present), cpu, cuda or cuda:N")
    r.add_argument("--workers", type=int, default=run("workers"),
                   help="background threads reading tiles while the model runs (0: no overlap)")
    r.add_argument("--reader-processes", type=int, default=run("reader_processes"), metavar="N",
                   help="read tiles in N forked processes instead of threads, as a GPU needs; "
                        "default on CUDA: this process's share of the cores but one; elsewhere threads; 0: threads")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _tiling_from_args(args: argparse.Namespace) -> TilingConfig:
    from casd_core.vectorio import read_aoi

    aoi, aoi_crs = read_aoi(args.aoi) if args.aoi else (None, None)
    return TilingConfig(tile_size=args.tile_size, unit=args.unit, overlap=args.overlap,
                        stride=args.stride, nodata_threshold=args.nodata_threshold, bands=parse_bands(args.bands),
                        extent=tuple(args.extent) if args.extent else None, aoi=aoi, aoi_crs=aoi_crs)


def _inference_from_args(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig(batch_size=args.batch_size, device=args.device, workers=args.workers,
                           reader_processes=args.reader_processes, tta=args.tta, min_score=args.min_score,
                           smooth=args.smooth)


def _radiometry_from_args(args: argparse.Namespace) -> RadiometryConfig:
    value_range = parse_value_range(*args.value_range) if args.value_range else None
    return RadiometryConfig(stretch=args.stretch, percentiles=tuple(args.percentiles),
                            value_range=value_range, nodata=args.nodata, auto_nodata=args.auto_nodata)


def _monitor(args: argparse.Namespace, bar: "_ProgressBar", who: str = ""):
    """``who`` ("rank 1: ") names the process in warnings when several run."""
    from casd_core.errors import render_params
    from casd_core.progress import Monitor

    name_of = name_of_flag(args.parser)

    def warn(message: str) -> None:
        bar.close()
        print(f"casd {args.command}: warning: {who}{render_params(message, name_of)}", file=sys.stderr)

    return Monitor(on_progress=bar, on_warning=warn)


class _ProgressBar:
    """Renders :class:`ProgressEvent` as a tqdm bar, one per (item, stage): one bar for a
    raster, a short-lived bar per raster of a folder. Folder-level "rasters" events are left
    to the summary table printed at the end."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.key: tuple[str, str] | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet or event.stage == "rasters":
            return
        key = (event.item, event.stage)
        if self.bar is None or key != self.key or event.total != self.bar.total:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=event.total, unit=event.stage.rstrip("s"), desc=event.item or None,
                            leave=not event.item, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
            self.key = key
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _ranks(device: str) -> Iterator[tuple[int, int, str]]:
    """(rank, world size, device of this rank) inside the process group when torchrun started
    several processes; else (0, 1, ``device``) without importing torch (the ONNX install)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        yield 0, 1, device
        return
    from casd_core import distributed

    with distributed.process_group(device) as rank:
        yield rank.rank, rank.world_size, str(rank.device)


def _run_predict(args: argparse.Namespace) -> int:
    """Under torchrun the raster's rows are shared out over the ranks; rank 0 writes."""
    from casd_core.grid_outputs import check_requests, write_grid_outputs
    from casd_core.inference import Predictor
    from casd_core.inference.classify import classify_raster_across_ranks

    if args.output.exists() and not args.overwrite:
        raise CasdError(f"{args.output} already exists; pass {param('overwrite')} to replace it")
    tiling, inference, radiometry = _tiling_from_args(args), _inference_from_args(args), _radiometry_from_args(args)
    check_requests(args.raster_out, inference.smooth, args.dissolve)
    if args.suggest is not None and (args.suggest < 1 or inference.smooth or args.dissolve):
        raise CasdError(f"{param('suggest')} needs a number of tiles (at least 1) and a layer of tiles, "
                        f"not of {param('smooth')} cells or {param('dissolve')} regions")
    with _ranks(inference.device) as (rank, _, device):
        inference.device = device
        predictor = Predictor.from_package(args.model, inference.device)
        # Every rank plans the same raster and would say the same: rank 0 speaks for all.
        bar = _ProgressBar(args.quiet or rank > 0)
        monitor = _monitor(args, bar) if rank == 0 else None
        try:
            summary = classify_raster_across_ranks(args.raster, args.output, model=predictor, tiling=tiling,
                                                   inference=inference, fmt=args.format, dissolve=args.dissolve,
                                                   monitor=monitor, radiometry=radiometry)
        finally:
            bar.close()
    if rank > 0:
        return 0
    top = ", ".join(f"{name} {count}" for name, count in list(summary.class_counts.items())[:5])
    print(f"wrote {summary.output}: {summary.features} feature(s) from {summary.tiles} tile(s), "
          f"{summary.skipped_nodata} skipped as nodata ({summary.nodata_share:.0%}), "
          f"{summary.uncertain} uncertain ({summary.uncertain_share:.0%}), {summary.seconds:.1f} s "
          f"({summary.tiles_per_second:.1f} tiles/s)")
    print(f"most frequent classes: {top}")
    print(f"values: {summary.values['casd_stretch']}; padding: {summary.values['casd_padding']}")
    for path in write_grid_outputs(args.output, summary.plan, predictor.package, args.preview,
                                   args.raster_out).values():
        print(f"wrote {path}")
    if args.suggest:
        from casd_core.suggest import write_suggestions

        suggestions = suggestions_path(args.output)
        count = write_suggestions(args.output, suggestions, args.suggest)
        print(f"wrote {suggestions}: {count} tile(s) to label next (fill in their 'class' field)")
    return 0


def suggestions_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_suggestions{output.suffix}")


def _run_batch(args: argparse.Namespace) -> int:
    """Under torchrun each rank classifies its share of the folder on its own device; rank 0
    shows progress and prints the summary of all."""
    from casd_core.inference import classify_folder

    tiling, inference, radiometry = _tiling_from_args(args), _inference_from_args(args), _radiometry_from_args(args)
    with _ranks(inference.device) as (rank, ranks, device):
        inference.device = device
        bar = _ProgressBar(args.quiet or rank > 0)
        who = f"rank {rank}: " if ranks > 1 else ""
        try:
            summary = classify_folder(args.folder, args.output, model=args.model, tiling=tiling,
                                      inference=inference, recursive=not args.no_recursive,
                                      overwrite=args.overwrite, merged=args.merged, fmt=args.format,
                                      monitor=_monitor(args, bar, who), dissolve=args.dissolve,
                                      radiometry=radiometry)
        finally:
            bar.close()
    if rank > 0:
        return 0
    print(summary.table(name_of_flag(args.parser)))
    return 1 if summary.failed else 0
