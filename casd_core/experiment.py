"""Experiments: one TOML file per table row, run over several seeds, resumable, summarised.

A row file holds the settings of :class:`~casd_core.train.TrainConfig` (``[loss]`` for the
loss) and the list of ``seeds``; ``extends = "base.toml"`` merges a shared base first, so
every method of a study shares backbone, input size, epochs, optimiser and augmentation.
Paths ``data`` and ``split`` are relative to the data root (``$CASD_DATA``). Each seed trains
into ``<runs>/<row name>/seed<k>/`` and resumes there after an interruption; finished seeds
are skipped, so a study can be spread over many short sessions. ``run_parallel`` trains several
seeds at once in child processes (a GPU is rarely saturated by one small-batch run).
``evaluate_tta`` scores a finished seed's test rows once more with test-time augmentation, for
the table's TTA column.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casd_core.atomic import write_text_atomic
from casd_core.data import default_data_root
from casd_core.errors import CasdError
from casd_core.finetune import finetune_config, resolve_init
from casd_core.losses import LossConfig
from casd_core.progress import Monitor
from casd_core.train import METRICS_LOG_NAME, RESULT_NAME, TrainConfig, train

TTA_NAME = "tta.json"  # a seed's test scores with test-time augmentation (evaluate_tta)


@dataclass
class Row:
    """One row of a results table: a training config and the seeds it runs with."""

    name: str
    settings: dict[str, Any]
    seeds: list[int]
    path: Path

    def run_dir(self, runs_dir: Path, seed: int) -> Path:
        return runs_dir / self.name / f"seed{seed}"

    def finished(self, runs_dir: Path, seed: int, data_root: Path | None = None) -> bool:
        """Whether that seed's run is done; one trained with other settings than this row's now
        (the row file or its base edited since) is an error, not a finished seed of the row."""
        path = self.run_dir(runs_dir, seed) / RESULT_NAME
        if not path.is_file():
            return False
        recorded = json.loads(path.read_text()).get("fingerprint")  # absent: finished before it was recorded
        cfg = train_config(self, seed, runs_dir, data_root)
        if recorded and recorded != finetune_config(cfg, resolve_init(cfg.init)).fingerprint():
            raise CasdError(f"{path.parent} was trained with other settings than {self.path} gives now (the row "
                            "or a file it extends changed since); move that folder away to train the row anew, "
                            "or restore the settings it was trained with")
        return True


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
    return Row(name=settings.pop("name", path.stem), settings=settings, seeds=list(settings.pop("seeds", [0])),
               path=path)


def train_config(row: Row, seed: int, runs_dir: Path, data_root: Path | None = None,
                 device: str = "auto", workers: int | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one seed of ``row``."""
    data_root = data_root or default_data_root()
    settings = dict(row.settings)
    loss = LossConfig(**{"method": settings.get("method", "casd"), **settings.pop("loss", {})})
    data, split = settings.pop("data", "aid150"), settings.pop("split", None)
    try:
        return TrainConfig(data_root=data_root / data, split_csv=data_root / split if split else None,
                           out_dir=row.run_dir(runs_dir, seed), seed=seed, loss=loss, device=device,
                           **{"workers": workers, **settings})
    except TypeError as exc:
        raise CasdError(f"experiment {row.name!r} has a setting TrainConfig does not know: {exc}") from None


def run_row(row: Row, runs_dir: Path, data_root: Path | None = None, device: str = "auto",
            monitor: Monitor | None = None, seeds: list[int] | None = None,
            workers: int | None = None) -> list[dict[str, Any]]:
    """Train every seed of ``row`` (or only ``seeds``), resuming unfinished and skipping finished ones."""
    seeds = row.seeds if seeds is None else seeds
    for seed in seeds:
        if not row.finished(runs_dir, seed, data_root):  # result.json suffices: weights may live elsewhere
            train(train_config(row, seed, runs_dir, data_root, device, workers), monitor)
    return [seed_summary(row.run_dir(runs_dir, seed)) for seed in seeds]


def run_parallel(rows: list[Row], runs_dir: Path, parallel: int, data_root: Path | None = None,
                 device: str = "auto", workers: int | None = None) -> None:
    """Train the unfinished seeds of ``rows``, ``parallel`` at a time, each in its own process.

    Jobs start in the order given (rows first to last, seeds in row order), so the rows that
    matter most finish first when a session ends early. A child's output goes to
    ``<run dir>/train.log``; failed seeds are listed at the end and can simply be rerun. On CPU
    the children share the cores (:func:`child_environment`).
    """
    pending = [(row, seed) for row in rows for seed in row.seeds if not row.finished(runs_dir, seed, data_root)]
    running: list[tuple[Row, int, subprocess.Popen]] = []
    failed: list[str] = []
    env = child_environment(device, parallel)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                row, seed = pending.pop(0)
                running.append((row, seed, _start_seed(row, seed, runs_dir, data_root, device, workers, env)))
                print(f"started {row.name} seed {seed}", flush=True)
            time.sleep(1.0)
            for job in [job for job in running if job[2].poll() is not None]:
                running.remove(job)
                row, seed, process = job
                outcome = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                print(f"{outcome}: {row.name} seed {seed}", flush=True)
                if process.returncode != 0:
                    failed.append(str(row.run_dir(runs_dir, seed) / "train.log"))
    finally:  # interrupted: stop the children too (each keeps its last epoch's checkpoint)
        for _, _, process in running:
            process.terminate()
        for _, _, process in running:
            process.wait()
    if failed:
        raise CasdError(f"{len(failed)} run(s) failed; see {', '.join(failed)} and run the same command again")


def child_environment(device: str, parallel: int) -> dict[str, str]:
    """The environment of ``parallel`` training processes at once: on CPU each gets its share of
    the cores as torch threads (``OMP_NUM_THREADS``, unless set already), not a full team each,
    whose spinning threads would stall one another. Two 1-thread CE runs on 2 cores train 1.25x
    as many images as one 2-thread run (docs/BENCHMARKS.md, "Seeds side by side on CPU")."""
    from casd_core.runtime import cpu_threads, resolve_device

    env = dict(os.environ)
    if resolve_device(device).type == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_threads() // parallel))
    return env


def _start_seed(row: Row, seed: int, runs_dir: Path, data_root: Path | None, device: str,
                workers: int | None, env: dict[str, str]) -> subprocess.Popen:
    log_path = row.run_dir(runs_dir, seed) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "casd_core.cli", "experiment", str(row.path), "--seeds", str(seed),
               "--runs", str(runs_dir), "--device", device]
    command += ["--data", str(data_root)] if data_root else []
    command += ["--loader-workers", str(workers)] if workers is not None else []
    with log_path.open("a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def evaluate_tta(row: Row, seed: int, runs_dir: Path, data_root: Path | None = None, device: str = "auto",
                 monitor: Monitor | None = None) -> dict[str, Any]:
    """Test OA and kappa of a finished seed with test-time augmentation (the 8 flips and turns,
    8x an evaluation's cost) on the test rows its training scored, kept in the run's
    ``tta.json`` with the plain test OA of the package it scored: a retrained seed is scored
    again. Raises :class:`CasdError` when the seed's package or test rows are not there."""
    from casd_core.data import training_rows
    from casd_core.evaluate import evaluate_samples
    from casd_core.package import ModelPackage

    path = row.run_dir(runs_dir, seed) / TTA_NAME
    cfg = train_config(row, seed, runs_dir, data_root, device)
    package_path = cfg.out_dir / cfg.package_name
    if not package_path.is_file():
        raise CasdError(f"{row.name} seed {seed} has no package at {package_path} to score with TTA")
    package = ModelPackage.load(package_path)
    recorded = package.metrics.get("test", {})
    if path.is_file():
        scores = json.loads(path.read_text())
        if scores.get("package_overall_accuracy") == recorded.get("overall_accuracy"):
            return scores
    rows = training_rows(cfg.data_root, cfg.split_csv, cfg.val_fraction, cfg.data_seed, cfg.subset_per_class)
    if not rows.test or rows.class_names != package.class_names or len(rows.test) != recorded.get("num_samples"):
        raise CasdError(f"{row.name} seed {seed}: the test rows of {cfg.split_csv} are not those its training "
                        f"scored ({len(rows.test)} rows now, {recorded.get('num_samples')} then), so TTA is not scored")
    report = evaluate_samples(package, package_path, rows.test, device=device, monitor=monitor, tta=True)
    scores = {key: report[key] for key in ("overall_accuracy", "kappa", "num_samples")}
    scores["package_overall_accuracy"] = recorded["overall_accuracy"]
    write_text_atomic(json.dumps(scores, indent=2), path)
    return scores


def seed_summary(run_dir: Path) -> dict[str, Any]:
    """Test OA/kappa (also with TTA, once evaluated), best validation OA, training time and
    throughput of one finished run."""
    result = json.loads((run_dir / RESULT_NAME).read_text())
    history = [json.loads(line) for line in (run_dir / METRICS_LOG_NAME).read_text().splitlines()]
    test = result["metrics"].get("test", {})
    tta = json.loads((run_dir / TTA_NAME).read_text()) if (run_dir / TTA_NAME).is_file() else {}
    return {
        "seed": result["seed"],
        "overall_accuracy": test.get("overall_accuracy"),
        "kappa": test.get("kappa"),
        "tta_accuracy": tta.get("overall_accuracy"),
        "val_accuracy": result["metrics"]["validation"]["overall_accuracy"],
        "train_seconds": sum(entry["epoch_seconds"] for entry in history),
        "images_per_s": statistics.fmean(entry["images_per_s"] for entry in history),
    }


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}" if values else "—"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def summary_table(rows: list[Row], runs_dir: Path, data_root: Path | None = None) -> str:
    """A Markdown table: mean ± std over the finished seeds of every row (test split); a TTA
    column once any seed has been scored with it (over the seeds that have)."""
    done_of = {row.name: [seed_summary(row.run_dir(runs_dir, seed)) for seed in row.seeds
                          if row.finished(runs_dir, seed, data_root)] for row in rows}
    with_tta = any(d["tta_accuracy"] is not None for done in done_of.values() for d in done)
    tta_head, tta_rule = (" TTA OA % |", "---|") if with_tta else ("", "")
    lines = [f"| row | method | seeds done | OA % |{tta_head} kappa × 100 | val OA % | train min/seed | images/s |",
             f"|---|---|---|---|{tta_rule}---|---|---|---|"]
    for row in rows:
        done = done_of[row.name]
        if not done:
            lines.append(f"| {row.name} | {row.settings.get('method', 'casd')} | 0/{len(row.seeds)} | — |"
                         f"{' — |' if with_tta else ''} — | — | — | — |")
            continue
        tta = [d["tta_accuracy"] for d in done if d["tta_accuracy"] is not None]
        fewer = f" ({len(tta)}/{len(done)} seeds)" if tta and len(tta) < len(done) else ""
        tta_cell = f" {_mean_std(tta)}{fewer} |" if with_tta else ""
        lines.append(
            f"| {row.name} | {row.settings.get('method', 'casd')} | {len(done)}/{len(row.seeds)} "
            f"| {_mean_std([d['overall_accuracy'] for d in done])} |{tta_cell} {_mean_std([d['kappa'] for d in done])} "
            f"| {_mean_std([d['val_accuracy'] for d in done])} "
            f"| {statistics.fmean(d['train_seconds'] for d in done) / 60:.1f} "
            f"| {statistics.fmean(d['images_per_s'] for d in done):.1f} |")
    return "\n".join(lines)
