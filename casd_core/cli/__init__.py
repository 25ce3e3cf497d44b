"""The ``casd`` command: train, evaluate, predict and batch, thin faces over casd_core.

Defaults come from the core's config dataclasses (one place); an option's ``dest`` is the
config field it sets, so a core error about a setting (``param("tile_size")``) is shown
with the flag the user typed (``--tile-size``). Without torch (the light install) the
training commands are stubs that say what to install; predict, batch and export need no torch.
"""

from __future__ import annotations

import argparse
import sys

from casd_core.backend import require_torch, torch_available
from casd_core.cli.chips import add_chips_parser
from casd_core.cli.common import add_command, name_of_flag
from casd_core.cli.export import add_export_parser
from casd_core.cli.predict import add_batch_parser, add_predict_parser
from casd_core.errors import CasdError

TORCH_COMMANDS = ("train", "evaluate", "calibrate", "experiment")
# evaluate runs .onnx models too, but decodes and resizes the images with torchvision as training does
TORCH_ONLY_REASONS = {"evaluate": "casd evaluate needs PyTorch, also for an .onnx model (its images are read and "
                                  "resized with torchvision, exactly as in training); run it in the full install "
                                  "(pip install -r requirements.txt)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd",
        description="Remote-sensing scene classification with Class-Aware Self-Distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if torch_available():
        from casd_core.cli.training import (add_calibrate_parser, add_evaluate_parser, add_experiment_parser,
                                            add_train_parser)

        add_train_parser(subparsers)
        add_evaluate_parser(subparsers)
        add_calibrate_parser(subparsers)
        add_experiment_parser(subparsers)
    else:
        for name in TORCH_COMMANDS:
            _add_torch_only_parser(subparsers, name)
    add_predict_parser(subparsers)
    add_batch_parser(subparsers)
    add_chips_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def _add_torch_only_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    """A command that needs PyTorch, in a Python without it: any arguments, one clear error."""
    def run(args: argparse.Namespace) -> int:
        if name in TORCH_ONLY_REASONS:
            raise CasdError(TORCH_ONLY_REASONS[name])
        require_torch(f"casd {name}")
        return 2

    p = add_command(subparsers, name, run, "(needs PyTorch, not installed here)",
                    f"casd {name} needs PyTorch; this is the light install (onnxruntime only).")
    p.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and exit 2, Ctrl-C exits 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CasdError as exc:
        print(f"casd {args.command}: error: {exc.render(name_of_flag(args.parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"casd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130

