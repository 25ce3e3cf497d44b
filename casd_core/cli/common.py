"""What every ``casd`` subcommand shares: defaults read from the config dataclasses, the help
formatter, ``--bands`` parsing and the flag names errors are rendered with."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from casd_core.errors import CasdError, param


def default_of(config: type, name: str) -> Any:
    """The default of one field of a config dataclass (the single source of defaults)."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where there is a real default the help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return text + " (default: %(default)s)"


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``--bands 1,2,3`` as 1-based band numbers (None when not given)."""
    if not text:
        return None
    try:
        bands = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise CasdError(f"{param('bands')} {text!r} is not a list of band numbers; write them "
                        "like 1,2,3") from None
    if not bands or min(bands) < 1:
        raise CasdError(f"{param('bands')} {text!r}: band numbers start at 1")
    return bands


def name_of_flag(parser: argparse.ArgumentParser) -> Callable[[str], str]:
    """Names a setting's key as this command's user types it (for error and warning texts)."""
    names = flag_names(parser)
    return lambda key: names.get(key, "--" + key.replace("_", "-"))


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config key (an option's dest) -> what the user types: ``--tile-size``, or ``RASTER``."""
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = next((s for s in action.option_strings if s.startswith("--")),
                                      action.option_strings[0])
        elif action.dest != argparse.SUPPRESS:
            names[action.dest] = action.metavar or action.dest.upper()
    return names


def add_command(subparsers: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int],
                summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose namespace knows how to run it and its own parser (for error rendering)."""
    parser = subparsers.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
    parser.set_defaults(run=run, parser=parser)
    return parser
