"""``casd export``: a model package → a self-describing ONNX model for onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

from casd_core.cli.common import add_command, default_of
from casd_core.errors import CasdError, param
from casd_core.onnx.quantize import CalibrationConfig


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    calibration = lambda name: default_of(CalibrationConfig, name)  # noqa: E731
    p = add_command(
        subparsers, "export", _run_export, "export a model package to ONNX (runs without PyTorch)",
        "Write the package's network as an ONNX model with a dynamic batch, its output the "
        "calibrated class probabilities, and the whole package description (classes, colours, "
        "bands, normalisation, footprint, metrics) plus Deepness's metadata keys in its "
        "metadata. `casd predict -m MODEL.onnx` and the QGIS algorithms run it in onnxruntime. "
        "The file is written atomically.")
    p.add_argument("model", type=Path, nargs="?",
                   help="model package (.safetensors); default: the embedded AID model")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the file, computed in float32; probabilities "
                        "move by ~1e-3)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantization, calibrated on the train rows of --calibration")
    p.add_argument("--calibration", dest="split_csv", type=Path, metavar="SPLIT_CSV",
                   help="split CSV (path,label,split) whose train rows calibrate --int8")
    p.add_argument("--data-root", dest="data_root", type=Path,
                   help="folder the CSV's paths are relative to (default: the CSV's folder)")
    p.add_argument("--calibration-per-class", type=int, default=calibration("calibration_per_class"),
                   help="training images per class used for calibration")


def _run_export(args: argparse.Namespace) -> int:
    from casd_core.onnx.export import export_onnx

    if args.output.suffix.lower() != ".onnx":
        raise CasdError(f"{param('output')} {args.output} must end in .onnx")
    if args.output.exists() and not args.overwrite:
        raise CasdError(f"{args.output} already exists; pass {param('overwrite')} to replace it")
    if args.half and args.int8:
        raise CasdError(f"choose one of {param('half')} and {param('int8')}")
    if args.split_csv is not None and not args.int8:
        raise CasdError(f"{param('split_csv')} calibrates an int8 export; add {param('int8')}")
    calibration = None
    if args.int8:
        if args.split_csv is None:
            raise CasdError(f"{param('int8')} needs calibration images: pass {param('split_csv')} "
                            "(a split CSV whose train rows to use)")
        calibration = CalibrationConfig(args.split_csv, args.data_root, args.calibration_per_class)
    path = export_onnx(args.model, args.output, half=args.half, int8=args.int8, calibration=calibration)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
