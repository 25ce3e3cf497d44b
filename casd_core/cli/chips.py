"""``casd chips``: labelled polygons over rasters → training chips for ``casd train``."""

from __future__ import annotations

import argparse
from pathlib import Path

from casd_core.chips.config import SPLIT_BY, ChipConfig
from casd_core.cli.common import add_command, default_of, name_of_flag
from casd_core.tiling import UNITS


def add_chips_parser(subparsers: argparse._SubParsersAction) -> None:
    default = (lambda name: default_of(ChipConfig, name))
    p = add_command(
        subparsers, "chips", _run_chips, "cut training chips from rasters where labelled polygons say what they show",
        "Cut each RASTER into tiles on the grid `casd predict` uses and keep those that polygons "
        "of one class of LABELS (any vector file GDAL reads, in any CRS) cover: "
        "CHIPDIR/<class>/<raster>_<row>_<col>.tif (georeferenced, every band in the source "
        "dtype), CHIPDIR/chips.gpkg (each chip's footprint, class and split, styled for QGIS) and "
        "CHIPDIR/split.csv, a spatial train/test split (whole polygons or blocks, never single "
        "chips). Then: casd train --data CHIPDIR --split CHIPDIR/split.csv. CHIPDIR must be empty "
        "or new; --overwrite first removes what an earlier run wrote there.")
    p.add_argument("rasters", type=Path, nargs="+", metavar="RASTER", help="georeferenced rasters (GeoTIFF, ...)")
    p.add_argument("--labels", type=Path, required=True,
                   help="polygons with a class each (GeoPackage, shapefile, GeoJSON, ...; any CRS)")
    p.add_argument("--class-field", required=True, help="the field of --labels that holds the class name")
    p.add_argument("--color-field",
                   help="a field of --labels that holds each polygon's colour (#rrggbb): its class's colour in "
                        "chips.gpkg and in the model trained on the chips (CHIPDIR/classes.json); "
                        "without it: map colours by class name")
    p.add_argument("-o", "--output", dest="out_dir", type=Path, required=True, metavar="CHIPDIR",
                   help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty CHIPDIR: remove the chips, index and split an earlier run wrote there")
    t = p.add_argument_group("chips")
    t.add_argument("-m", "--model", type=Path,
                   help="the model to fine-tune: its recommended footprint is the default tile size "
                        "(default: the embedded AID model, 120 m; 224 px without a model)")
    t.add_argument("--tile-size", type=float, help="chip size in --unit; default: the --model's footprint")
    t.add_argument("--unit", choices=list(UNITS), default=default("unit"),
                   help="unit of --tile-size and --stride: metres on the ground or raster pixels")
    t.add_argument("--stride", type=float, help="step between chips in --unit; default: the tile size (no overlap)")
    t.add_argument("--min-coverage", type=float, default=default("min_coverage"),
                   help="share of a chip that polygons of its class must cover")
    t.add_argument("--max-other-coverage", type=float, default=default("max_other_coverage"),
                   help="a chip that polygons of other classes cover more is mixed and dropped")
    t.add_argument("--nodata-threshold", type=float, default=default("nodata_threshold"),
                   help="chips with a larger nodata share (the raster's mask) are skipped")
    s = p.add_argument_group("split")
    s.add_argument("--split-by", choices=list(SPLIT_BY), default=default("split_by"),
                   help="spatial groups kept on one side: polygons (touching ones of a class joined) or square blocks")
    s.add_argument("--block-size", type=float, default=default("block_size"),
                   help="side of a block of --split-by block, in metres")
    s.add_argument("--test-fraction", type=float, default=default("test_fraction"),
                   help="share of each class's chips held out for test, in whole groups")
    s.add_argument("--seed", type=int, default=default("seed"), help="seed of the split")
    s.add_argument("--min-chips", type=int, default=default("min_chips"),
                   help="classes with fewer chips are reported as too few")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_chips(args: argparse.Namespace) -> int:
    from casd_core.chips import make_chips, read_class_colors
    from casd_core.cli.predict import _monitor, _ProgressBar

    fields = {name: getattr(args, name) for name in ChipConfig.__dataclass_fields__ if name != "class_colors"}
    if args.color_field:
        fields["class_colors"] = read_class_colors(args.labels, args.class_field, args.color_field)
    bar = _ProgressBar(args.quiet)
    try:
        summary = make_chips(args.rasters, args.labels, args.class_field, args.out_dir,
                             ChipConfig(**fields), monitor=_monitor(args, bar))
    finally:
        bar.close()
    print(summary.table(name_of_flag(args.parser)))
    return 0
