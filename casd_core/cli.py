"""The ``casd`` command: train, evaluate, predict and batch, thin faces over casd_core."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from casd_core.errors import CasdError


def _parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``--bands 1,2,3`` as 1-based band numbers (None when not given)."""
    if not text:
        return None
    try:
        bands = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise CasdError(f"--bands {text!r} is not a list of band numbers; write them like 1,2,3") from None
    if not bands or min(bands) < 1:
        raise CasdError(f"--bands {text!r}: band numbers start at 1")
    return bands


# --- train / evaluate --------------------------------------------------------------------

def _run_train(args: argparse.Namespace) -> int:
    from casd_core.losses import LossConfig
    from casd_core.train import TrainConfig, train

    loss = LossConfig(method=args.method, temperature=args.temperature, distill_weight=args.distill_weight,
                      label_smoothing=args.label_smoothing, distance=args.distance,
                      detach_partner=not args.no_detach_partner, partner_ce=not args.no_partner_ce,
                      alpha_mode=args.alpha_mode, alpha_init=args.alpha_init, alpha_min=args.alpha_min,
                      alpha_max=args.alpha_max, alpha_target_active=args.alpha_target_active)
    cfg = TrainConfig(
        data_root=args.data, split_csv=args.split, out_dir=args.out, method=args.method,
        backbone=args.backbone, pretrained=None if args.pretrained == "none" else args.pretrained,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, input_size=args.input_size, val_fraction=args.val_fraction,
        seed=args.seed, negatives=args.negatives, loss=loss, subset_per_class=args.subset_per_class,
        package_name=args.package_name, device=args.device, workers=args.workers,
        bands=_parse_bands(args.bands), value_scale=args.value_scale, gsd_m=args.gsd, tile_footprint_m=args.tile_footprint,
    )
    result = train(cfg)
    test = result.metrics.get("test")
    print(f"model package: {result.package_path}")
    print(f"validation OA: {result.metrics['validation']['overall_accuracy']:.4f}")
    if test:
        print(f"test OA: {test['overall_accuracy']:.4f}  kappa: {test['kappa']:.4f}  (n={test['num_samples']})")
    return 0


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a scene classifier (plain CE, CS-KD or CASD)",
        description="Train a scene classifier on a folder of class sub-folders. A validation split is "
                    "carved from the 'train' rows for model selection; the 'test' rows are evaluated once "
                    "at the end. Rerun the same command after an interruption to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder the images (and the CSV paths) live in")
    p.add_argument("--split", type=Path, help="CSV with columns path,label,split (train/test rows); "
                                               "without it every image under --data/<class>/ is training data")
    p.add_argument("--out", type=Path, required=True, help="output folder: model package, metrics log, confusion matrix")
    p.add_argument("--method", choices=["ce", "cskd", "casd"], default="casd", help="training objective")
    p.add_argument("--backbone", default="efficientnet_lite0", help="network architecture (see docs for the list)")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default="imagenet",
                   help="start from ImageNet weights (offline for efficientnet_lite0) or from scratch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="anchors per batch (CASD forwards 3x this many images)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    p.add_argument("--input-size", type=int, default=150, help="image side in pixels fed to the network")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class's train rows held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset-per-class", type=int, help="use at most this many images per class (quick runs)")
    g = p.add_argument_group("CS-KD / CASD distillation")
    g.add_argument("--negatives", choices=["random", "confusion", "centroid"], default="centroid",
                   help="how CASD picks the other-class image: uniformly, or preferring classes the model confuses")
    g.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T of the distilled distributions")
    g.add_argument("--distill-weight", type=float, default=1.0, help="lambda: weight of the distillation loss")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--distance", choices=["kl", "js"], default="kl", help="distance between distributions")
    g.add_argument("--no-detach-partner", action="store_true", help="let gradients flow into the partner branches")
    g.add_argument("--no-partner-ce", action="store_true", help="cross-entropy on the anchor only")
    g.add_argument("--alpha-mode", choices=["fixed", "learnable", "adaptive"], default="learnable",
                   help="the CASD margin: constant, learned within bounds, or learned against its own target")
    g.add_argument("--alpha-init", type=float, default=0.5)
    g.add_argument("--alpha-min", type=float, default=0.0)
    g.add_argument("--alpha-max", type=float, default=2.0)
    g.add_argument("--alpha-target-active", type=float, default=0.1,
                   help="adaptive alpha: share of triplets that should still violate the margin")
    m = p.add_argument_group("imagery, package description and hardware")
    m.add_argument("--bands", help="1-based bands of multi-band GeoTIFF chips to train on, e.g. 1,2,3,4")
    m.add_argument("--value-scale", type=float,
                   help="divide pixel values by this to get [0, 1] (default 255 for uint8; required for uint16)")
    m.add_argument("--gsd", type=float, help="nominal ground sample distance of the training images, metres/pixel")
    m.add_argument("--tile-footprint", type=float, help="recommended ground size of one tile at inference, metres")
    m.add_argument("--package-name", default="model.safetensors", help="file name of the model package in --out")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    m.add_argument("--workers", type=int, help="DataLoader worker processes (default: 1 on CPU, up to 8 on CUDA)")
    p.set_defaults(run=_run_train)


def _run_evaluate(args: argparse.Namespace) -> int:
    from casd_core.evaluate import evaluate_package

    report = evaluate_package(args.model, args.data, args.split, split=args.subset, out_dir=args.out,
                              batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['split']} rows of {args.split}: n={report['num_samples']}")
    print(f"overall accuracy {report['overall_accuracy']:.4f}  kappa {report['kappa']:.4f}  macro F1 {report['macro_f1']:.4f}")
    width = max(len(name) for name in report["per_class"])
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in report["per_class"].items():
        print(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    if args.out:
        print(f"wrote {', '.join(report['files'].values())}")
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate a model package on the test rows of a split CSV",
        description="Overall accuracy, Cohen's kappa and per-class precision/recall/F1 of a model package "
                    "on one split (default: the 'test' rows) of a path,label,split CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="model package (.safetensors) written by `casd train`")
    p.add_argument("--data", type=Path, required=True, help="folder the CSV paths are relative to")
    p.add_argument("--split", type=Path, required=True, help="CSV with columns path,label,split")
    p.add_argument("--subset", default="test", help="which split's rows to evaluate")
    p.add_argument("--out", type=Path, help="also write metrics.json, confusion_matrix.csv and .png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.set_defaults(run=_run_evaluate)


def _run_experiment(args: argparse.Namespace) -> int:
    from casd_core.experiment import load_row, run_parallel, run_row, summary_table

    rows = [load_row(path) for path in args.rows]
    if args.seeds is not None:
        for row in rows:
            row.seeds = args.seeds
    if args.parallel < 1:
        raise CasdError("--parallel must be at least 1")
    if args.parallel > 1 and not args.summary_only:
        run_parallel(rows, args.runs, args.parallel, args.data, args.device, args.loader_workers)
    elif not args.summary_only:
        for row in rows:
            print(f"== {row.name}: seeds {row.seeds}")
            run_row(row, args.runs, args.data, args.device, workers=args.loader_workers)
    print(summary_table(rows, args.runs))
    return 0


def _add_experiment_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment", help="run table rows of a study (config files) over their seeds, then summarise",
        description="Train every seed of each row file (TOML, see experiments/) into RUNS/<row>/seed<k>/, "
                    "resuming interrupted runs and skipping finished ones, then print a Markdown table of "
                    "test OA and kappa (mean ± std over seeds), training time and images/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("rows", type=Path, nargs="+", help="row files, e.g. experiments/aid20/casd.toml")
    p.add_argument("--runs", type=Path, default=Path("runs/experiments"), help="where the runs live")
    p.add_argument("--data", type=Path, help="data root the row paths are relative to (default: $CASD_DATA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seeds", type=int, nargs="+", help="run only these seeds instead of the rows' own")
    p.add_argument("--parallel", type=int, default=1,
                   help="train this many seeds at once, each in its own process (e.g. 4 on one GPU)")
    p.add_argument("--loader-workers", type=int,
                   help="data-loading processes per run (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--summary-only", action="store_true", help="only print the table of what is finished")
    p.set_defaults(run=_run_experiment)


# --- predict / batch (inference) -----------------------------------------------------------

def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="label a raster tile by tile and write the grid as a vector layer",
        description="Slide a window over a georeferenced raster, classify each tile and write one "
                    "polygon per tile (class, score, uncertainty, top-3) in the raster's CRS, styled "
                    "for QGIS. The output is written atomically: an interrupted run leaves no file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("raster", type=Path, help="georeferenced raster (GeoTIFF, ...)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output layer: .gpkg (default format), .geojson or .fgb")
    p.add_argument("--format", choices=["gpkg", "geojson", "fgb"],
                   help="output format; None: from the output's suffix")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    _add_inference_arguments(p)
    p.set_defaults(run=_run_predict)


def _add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch", help="label every raster of a folder (resumable)",
        description="Run `casd predict` over every *.tif/*.tiff of a folder (recursively), one output "
                    "per raster under OUTDIR (sub-folders mirrored). Rasters whose output exists are "
                    "skipped, so rerunning after an interruption resumes. A raster that fails is "
                    "reported and the batch goes on; the exit code is 1 if any failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of rasters")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                   help="output folder (created if needed)")
    p.add_argument("--format", choices=["gpkg", "geojson", "fgb"], default="gpkg", help="output format")
    p.add_argument("--overwrite", action="store_true", help="redo rasters whose output exists")
    p.add_argument("--no-recursive", action="store_true", help="only the folder itself, not sub-folders")
    p.add_argument("--merged", action="store_true",
                   help="also write OUTDIR/merged.<format>: every tile of every raster, with a 'source' field")
    _add_inference_arguments(p)
    p.set_defaults(run=_run_batch)


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", type=Path,
                   help="model package (.safetensors); None: the embedded AID model")
    t = p.add_argument_group("tiling")
    t.add_argument("--tile-size", type=float,
                   help="tile size in --unit; None: the model's recommended ground footprint")
    t.add_argument("--unit", choices=["m", "px"], default="m",
                   help="unit of --tile-size and --stride: metres on the ground or raster pixels")
    t.add_argument("--overlap", type=float, default=0.0, help="overlap between tiles, fraction of a tile")
    t.add_argument("--stride", type=float, help="step between tiles in --unit (overrides --overlap)")
    t.add_argument("--nodata-threshold", type=float, default=0.5,
                   help="tiles with a larger nodata fraction get no label")
    t.add_argument("--bands", help="raster bands (1-based) in the model's band order, e.g. 1,2,3; "
                                   "None: by colour interpretation, else the first ones")
    t.add_argument("--extent", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="only this rectangle, in the raster's CRS")
    t.add_argument("--aoi", type=Path, help="only tiles overlapping the polygons of this vector file")
    t.add_argument("--dissolve", action="store_true",
                   help="merge adjacent tiles of the same class into region polygons")
    r = p.add_argument_group("hardware")
    r.add_argument("--batch-size", type=int, default=32, help="tiles per model call")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    r.add_argument("--workers", type=int, default=1,
                   help="background threads reading tiles while the model runs (0: no overlap)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _tiling_from_args(args: argparse.Namespace):
    from casd_core.tiling import TilingConfig
    from casd_core.vectorio import read_aoi

    aoi, aoi_crs = read_aoi(args.aoi) if args.aoi else (None, None)
    return TilingConfig(tile_size=args.tile_size, unit=args.unit, overlap=args.overlap,
                        stride=args.stride, nodata_threshold=args.nodata_threshold, bands=_parse_bands(args.bands),
                        extent=tuple(args.extent) if args.extent else None, aoi=aoi, aoi_crs=aoi_crs)


def _inference_from_args(args: argparse.Namespace):
    from casd_core.inference import InferenceConfig

    return InferenceConfig(batch_size=args.batch_size, device=args.device, workers=args.workers)


class _TileBar:
    """A tqdm bar (tiles, tiles/s) fed by the pipeline's progress messages; one per raster."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.label = None

    def __call__(self, fraction: float, message: str) -> None:
        from casd_core.inference import parse_tile_progress

        parsed = parse_tile_progress(message)
        if self.quiet or parsed is None:
            return
        done, total = parsed
        label = message.rpartition(": ")[0] or None
        if self.bar is None or label != self.label or total != self.bar.total:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, unit="tile", desc=label, leave=label is None,
                            dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
            self.label = label
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_predict(args: argparse.Namespace) -> int:
    from casd_core.inference import classify_raster
    from casd_core.progress import Monitor

    if args.output.exists() and not args.overwrite:
        raise CasdError(f"{args.output} already exists; pass --overwrite to replace it")
    tiling, inference = _tiling_from_args(args), _inference_from_args(args)
    bar = _TileBar(args.quiet)
    try:
        summary = classify_raster(args.raster, args.output, model=args.model, tiling=tiling,
                                  inference=inference, fmt=args.format, dissolve=args.dissolve,
                                  monitor=Monitor(on_progress=bar))
    finally:
        bar.close()
    top = ", ".join(f"{name} {count}" for name, count in list(summary.class_counts.items())[:5])
    print(f"wrote {summary.output}: {summary.features} feature(s) from {summary.tiles} tile(s), "
          f"{summary.skipped_nodata} skipped as nodata, {summary.seconds:.1f} s "
          f"({summary.tiles_per_second:.1f} tiles/s)")
    print(f"most frequent classes: {top}")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from casd_core.inference import classify_folder
    from casd_core.progress import Monitor

    tiling, inference = _tiling_from_args(args), _inference_from_args(args)
    bar = _TileBar(args.quiet)
    try:
        summary = classify_folder(args.folder, args.output, model=args.model, tiling=tiling,
                                  inference=inference, recursive=not args.no_recursive,
                                  overwrite=args.overwrite, merged=args.merged, fmt=args.format,
                                  monitor=Monitor(on_progress=bar), dissolve=args.dissolve)
    finally:
        bar.close()
    print(summary.table())
    return 1 if summary.failed else 0


# --- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd",
        description="Remote-sensing scene classification with Class-Aware Self-Distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_experiment_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_batch_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and exit 2, Ctrl-C exits 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CasdError as exc:
        print(f"casd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"casd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
