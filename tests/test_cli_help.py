"""`casd <cmd> --help`: no "(default: None)" noise, and every default shown is the one the
core's config dataclasses define (the CLI takes them from there)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from casd_core.cli import build_parser
from casd_core.inference import InferenceConfig
from casd_core.losses import LossConfig
from casd_core.tiling import TilingConfig
from casd_core.train import TrainConfig

COMMANDS = ("train", "evaluate", "calibrate", "experiment", "predict", "batch", "chips")
CONFIGS = {"train": (TrainConfig, LossConfig), "predict": (TilingConfig, InferenceConfig),
           "batch": (TilingConfig, InferenceConfig)}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_empty_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\bNone:", text), "help says 'None:' where it means the default"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_are_the_config_defaults(command):
    defaults = {}
    for config in CONFIGS[command]:
        for field in dataclasses.fields(config):
            if field.default is not dataclasses.MISSING:
                defaults[field.name] = field.default
    checked = 0
    for action in subparser(command)._actions:
        if action.dest not in defaults:
            continue
        expected = defaults[action.dest]
        if action.dest == "pretrained":  # the CLI spells "no weights" as "none"
            expected = expected or "none"
        assert action.default == expected, f"--{action.dest}: CLI {action.default!r} vs config {expected!r}"
        checked += 1
    assert checked >= 8


def test_train_recipe_flags_can_be_switched_both_ways():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--no-partner-ce"])
    assert args.partner_ce is False and args.detach_partner is LossConfig.detach_partner
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--no-detach-partner"])
    assert args.detach_partner is False
