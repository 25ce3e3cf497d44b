"""Experiments: one TOML file per table row, run over several seeds, resumable, summarised.

A row file holds the settings of :class:`~casd_core.train.TrainConfig` (``[loss]`` for the
loss) and the list of ``seeds``; ``extends = "base.toml"`` merges a shared base first, so
every method of a study shares backbone, input size, epochs, optimiser and augmentation.
Paths ``data`` and ``split`` are relative to the data root (``$CASD_DATA``). Each seed trains
into ``<runs>/<row name>/seed<k>/`` and resumes there after an interruption; finished seeds
are skipped, so a study can be spread over many short sessions.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casd_core.data import default_data_root
from casd_core.errors import CasdError
from casd_core.losses import LossConfig
from casd_core.package import ModelPackage
from casd_core.progress import Monitor
from casd_core.train import METRICS_LOG_NAME, TrainConfig, train


@dataclass
class Row:
    """One row of a results table: a training config and the seeds it runs with."""

    name: str
    settings: dict[str, Any]
    seeds: list[int]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _load_settings(path: Path) -> dict[str, Any]:
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CasdError(f"experiment file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise CasdError(f"{path} is not valid TOML: {exc}") from None
    parent = settings.pop("extends", None)
    return _merge(_load_settings(path.parent / parent), settings) if parent else settings


def load_row(path: str | Path) -> Row:
    """Read a row file, following ``extends`` chains (the row's own values win)."""
    path = Path(path)
    settings = _load_settings(path)
    return Row(name=settings.pop("name", path.stem), settings=settings, seeds=list(settings.pop("seeds", [0])))


def train_config(row: Row, seed: int, runs_dir: Path, data_root: Path | None = None,
                 device: str = "auto") -> TrainConfig:
    """The :class:`TrainConfig` of one seed of ``row``."""
    data_root = data_root or default_data_root()
    settings = dict(row.settings)
    loss = LossConfig(**{"method": settings.get("method", "casd"), **settings.pop("loss", {})})
    data, split = settings.pop("data", "aid150"), settings.pop("split", None)
    try:
        return TrainConfig(data_root=data_root / data, split_csv=data_root / split if split else None,
                           out_dir=runs_dir / row.name / f"seed{seed}", seed=seed, loss=loss, device=device,
                           **settings)
    except TypeError as exc:
        raise CasdError(f"experiment {row.name!r} has a setting TrainConfig does not know: {exc}") from None


def run_row(row: Row, runs_dir: Path, data_root: Path | None = None, device: str = "auto",
            monitor: Monitor | None = None) -> list[dict[str, Any]]:
    """Train every seed of ``row`` (resuming/skipping finished ones); one summary per seed."""
    return [seed_summary(train(train_config(row, seed, runs_dir, data_root, device), monitor).package_path)
            for seed in row.seeds]


def seed_summary(package_path: Path) -> dict[str, Any]:
    """Test OA/kappa, training time and throughput of one finished run."""
    package = ModelPackage.load(package_path)
    history = [json.loads(line) for line in (package_path.parent / METRICS_LOG_NAME).read_text().splitlines()]
    test = package.metrics.get("test", {})
    return {
        "seed": package.training["seed"],
        "overall_accuracy": test.get("overall_accuracy"),
        "kappa": test.get("kappa"),
        "val_accuracy": package.metrics["validation"]["overall_accuracy"],
        "train_seconds": sum(entry["epoch_seconds"] for entry in history),
        "images_per_s": statistics.fmean(entry["images_per_s"] for entry in history),
    }


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}" if values else "—"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def summary_table(rows: list[Row], runs_dir: Path) -> str:
    """A Markdown table: mean ± std over the finished seeds of every row (test split)."""
    lines = ["| row | method | seeds done | OA % | kappa × 100 | val OA % | train min/seed | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        done = [seed_summary(p) for seed in row.seeds
                if (p := runs_dir / row.name / f"seed{seed}" / row.settings.get("package_name", "model.safetensors")).is_file()]
        if not done:
            lines.append(f"| {row.name} | {row.settings.get('method', 'casd')} | 0/{len(row.seeds)} | — | — | — | — | — |")
            continue
        lines.append(
            f"| {row.name} | {row.settings.get('method', 'casd')} | {len(done)}/{len(row.seeds)} "
            f"| {_mean_std([d['overall_accuracy'] for d in done])} | {_mean_std([d['kappa'] for d in done])} "
            f"| {_mean_std([d['val_accuracy'] for d in done])} "
            f"| {statistics.fmean(d['train_seconds'] for d in done) / 60:.1f} "
            f"| {statistics.fmean(d['images_per_s'] for d in done):.1f} |")
    return "\n".join(lines)
