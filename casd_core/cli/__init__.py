"""The ``casd`` command: train, evaluate, predict and batch, thin faces over casd_core.

Defaults come from the core's config dataclasses (one place); an option's ``dest`` is the
config field it sets, so a core error about a setting (``param("tile_size")``) is shown
with the flag the user typed (``--tile-size``).
"""

from __future__ import annotations

import argparse
import sys

from casd_core.cli.chips import add_chips_parser
from casd_core.cli.common import name_of_flag
from casd_core.cli.predict import add_batch_parser, add_predict_parser
from casd_core.cli.training import (add_calibrate_parser, add_evaluate_parser, add_experiment_parser,
                                    add_train_parser)
from casd_core.errors import CasdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd",
        description="Remote-sensing scene classification with Class-Aware Self-Distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_experiment_parser(subparsers)
    add_predict_parser(subparsers)
    add_batch_parser(subparsers)
    add_chips_parser(subparsers)
    return parser


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

