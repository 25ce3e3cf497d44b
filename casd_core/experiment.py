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

A finished seed leaves a small record beside its row file,
``results/<row name>/seed<k>.json`` (:func:`seed_record`): its metrics, epoch history, test
confusion matrix, its labels for the validation rows and its TTA score. The tables and the
selection read the records, not the run folders, so a study committed with its records
outlives ``runs/`` (weights of gigabytes that a new machine does not have).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
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

RECORDS_DIR = "results"  # beside a study's row files: one record per finished seed (seed_record)


@dataclass
class Row:
    """One row of a results table: a training config and the seeds it runs with."""

    name: str
    settings: dict[str, Any]
    seeds: list[int]
    path: Path

    def run_dir(self, runs_dir: Path, seed: int) -> Path:
        return runs_dir / self.name / f"seed{seed}"

    def record_path(self, seed: int) -> Path:
        return self.path.parent / RECORDS_DIR / self.name / f"seed{seed}.json"

    def finished(self, runs_dir: Path, seed: int, data_root: Path | None = None) -> bool:
        """Whether that seed is done: its record or its run's ``result.json`` says so. One trained
        with other settings than this row's now (the row file or its base edited since) is an
        error, not a finished seed of the row."""
        for path in (self.record_path(seed), self.run_dir(runs_dir, seed) / RESULT_NAME):
            if not path.is_file():
                continue
            recorded = json.loads(path.read_text()).get("fingerprint")  # absent: finished before it was recorded
            cfg = train_config(self, seed, runs_dir, data_root)
            if recorded and recorded != finetune_config(cfg, resolve_init(cfg.init)).fingerprint():
                raise CasdError(f"{path} records a run trained with other settings than {self.path} gives now "
                                "(the row or a file it extends changed since); move it away to train the row "
                                "anew, or restore the settings it was trained with")
            return True
        return False


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
        if not row.finished(runs_dir, seed, data_root):  # its record suffices: weights may live elsewhere
            train(train_config(row, seed, runs_dir, data_root, device, workers), monitor)
    return [seed_summary(seed_record(row, seed, runs_dir, data_root, device)) for seed in seeds]


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


def seed_record(row: Row, seed: int, runs_dir: Path, data_root: Path | None = None,
                device: str = "auto") -> dict[str, Any]:
    """The record of a finished seed, written from its run folder when there is none yet or the
    seed was trained again since (its TTA score is then dropped, as it scored other weights)."""
    path = row.record_path(seed)
    record = json.loads(path.read_text()) if path.is_file() else None
    run_dir = row.run_dir(runs_dir, seed)
    if (run_dir / RESULT_NAME).is_file():
        result = json.loads((run_dir / RESULT_NAME).read_text())
        if record is None or record["metrics"] != result["metrics"]:
            record = _record_of_run(row, seed, runs_dir, result, data_root, device)
            _write_record(record, path)
    if record is None:
        raise CasdError(f"{row.name} seed {seed} is not finished: neither {path} nor {run_dir / RESULT_NAME} exists")
    return record


def _write_record(record: dict[str, Any], path: Path) -> None:
    """One line per key: a record is read, and diffed, by people."""
    lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic("{\n" + lines + "\n}\n", path)


def _record_of_run(row: Row, seed: int, runs_dir: Path, result: dict[str, Any], data_root: Path | None,
                   device: str) -> dict[str, Any]:
    from casd_core.evaluate import CONFUSION_CSV

    cfg = train_config(row, seed, runs_dir, data_root)
    run_dir = cfg.out_dir
    record: dict[str, Any] = {
        "row": row.name, "seed": seed, "fingerprint": result.get("fingerprint"),
        "machine": _machine(device),  # where the record was written: where it trained, unless backfilled
        "metrics": result["metrics"],
        "history": [json.loads(line) for line in (run_dir / METRICS_LOG_NAME).read_text().splitlines()],
    }
    confusion = run_dir / CONFUSION_CSV
    if confusion.is_file():
        with confusion.open(newline="", encoding="utf-8") as handle:
            record["test_confusion"] = [[int(v) for v in line[1:]] for line in list(csv.reader(handle))[1:]]
    if (run_dir / cfg.package_name).is_file() and cfg.val_fraction:
        record["validation_labels"] = validation_labels(run_dir / cfg.package_name, cfg.data_root, cfg.split_csv,
                                                        device)
    return record


def validation_labels(package_path: Path, data_root: Path, split_csv: Path | None,
                      device: str = "auto") -> dict[str, Any]:
    """What a package says on the validation rows its training carved (replayed from the
    package): the true and predicted class indices in carve order, and a digest of the carve's
    paths, so that two seeds' labels are compared only on the very same images."""
    from casd_core.calibration import replayed_rows
    from casd_core.evaluate import evaluation_model, package_dataset, predict_outputs
    from casd_core.package import ModelPackage

    package = ModelPackage.load(package_path)
    rows = replayed_rows(package, package_path, data_root, split_csv)
    model, where = evaluation_model(package, package_path, device)
    out = predict_outputs(model, package_dataset(package, rows.val), where)
    carve = "\n".join(str(Path(s.path).relative_to(data_root)) for s in rows.val)
    return {"carve_sha256": hashlib.sha256(carve.encode()).hexdigest(),
            "true": [int(v) for v in out.labels], "predicted": [int(v) for v in out.predicted]}


def _machine(device: str) -> str:
    """The CPU (or GPU) and torch that ran a seed: runs on other hardware differ in the last bits."""
    import torch

    from casd_core.runtime import resolve_device

    where = resolve_device(device)
    if where.type == "cuda":
        return f"{torch.cuda.get_device_name(where)}; torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}"


def evaluate_tta(row: Row, seed: int, runs_dir: Path, data_root: Path | None = None, device: str = "auto",
                 monitor: Monitor | None = None) -> dict[str, Any]:
    """Test OA and kappa of a finished seed with test-time augmentation (the 8 flips and turns,
    8x an evaluation's cost) on the test rows its training scored, kept in the seed's record.
    Raises :class:`CasdError` when the seed's package or test rows are not there."""
    from casd_core.data import training_rows
    from casd_core.evaluate import evaluate_samples
    from casd_core.package import ModelPackage

    record = seed_record(row, seed, runs_dir, data_root, device)
    if "tta" in record:
        return record["tta"]
    cfg = train_config(row, seed, runs_dir, data_root, device)
    package_path = cfg.out_dir / cfg.package_name
    if not package_path.is_file():
        raise CasdError(f"{row.name} seed {seed} has no package at {package_path} to score with TTA")
    package = ModelPackage.load(package_path)
    recorded = package.metrics.get("test", {})
    rows = training_rows(cfg.data_root, cfg.split_csv, cfg.val_fraction, cfg.data_seed, cfg.subset_per_class)
    if not rows.test or rows.class_names != package.class_names or len(rows.test) != recorded.get("num_samples"):
        raise CasdError(f"{row.name} seed {seed}: the test rows of {cfg.split_csv} are not those its training "
                        f"scored ({len(rows.test)} rows now, {recorded.get('num_samples')} then), so TTA is not scored")
    report = evaluate_samples(package, package_path, rows.test, device=device, monitor=monitor, tta=True)
    record["tta"] = {key: report[key] for key in ("overall_accuracy", "kappa", "num_samples")}
    _write_record(record, row.record_path(seed))
    return record["tta"]


def seed_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Test OA/kappa (also with TTA, once scored), best validation OA, training time and
    throughput of one seed's record (no time for a record without its epoch history)."""
    test = record["metrics"].get("test", {})
    history = record.get("history")
    return {
        "seed": record["seed"],
        "overall_accuracy": test.get("overall_accuracy"),
        "kappa": test.get("kappa"),
        "tta_accuracy": record.get("tta", {}).get("overall_accuracy"),
        "val_accuracy": record["metrics"]["validation"]["overall_accuracy"],
        "train_seconds": sum(entry["epoch_seconds"] for entry in history) if history else None,
        "images_per_s": statistics.fmean(entry["images_per_s"] for entry in history) if history else None,
    }


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return f"{100 * values[0]:.2f}" if values else "—"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _mean_of(values: list[float | None], scale: float = 1.0) -> str:
    known = [v for v in values if v is not None]
    return f"{scale * statistics.fmean(known):.1f}" if known else "—"


def summary_table(rows: list[Row], runs_dir: Path, data_root: Path | None = None) -> str:
    """A Markdown table: mean ± std over the finished seeds of every row (test split); a TTA
    column once any seed has been scored with it (over the seeds that have)."""
    done_of = {row.name: [seed_summary(seed_record(row, seed, runs_dir, data_root)) for seed in row.seeds
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
            f"| {_mean_of([d['train_seconds'] for d in done], 1 / 60)} "
            f"| {_mean_of([d['images_per_s'] for d in done])} |")
    return "\n".join(lines)
