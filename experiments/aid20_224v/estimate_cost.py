"""Estimate the CPU cost per seed of study rows from a few timed training steps (issue 14's queue).

    nice -n 19 .venv/bin/python experiments/aid20_224v/estimate_cost.py ROW.toml ... [--steps 3] [--batch-size 16]

Each row's seed-0 run is built as ``casd experiment`` builds it (data, loader, model, loss, CPU
tuning), ``--steps`` training steps are timed after two warm-up steps, and evaluation on 128
validation images. Both are measured in CPU seconds of this process (all its threads), which,
unlike wall time, hardly moves when other jobs share the cores. ``--batch-size`` times smaller
steps (less memory) and scales them to the row's batch. Per seed: ``epochs × (steps per epoch ×
step + validation rows × eval) + (test + validation rows) × eval`` (the final test pass and the
temperature fit). Prints one Markdown row per row file, with this process's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from casd_core.data import SceneDataset
from casd_core.evaluate import predict_outputs
from casd_core.experiment import load_row, train_config
from casd_core.train import Trainer, training_step

EVAL_IMAGES = 128
WARMUP_STEPS = 2


def estimate(path: Path, steps: int, runs: Path, batch_size: int | None) -> dict[str, float]:
    """CPU seconds per training step (at the row's batch) and per evaluated image, and the
    estimated CPU hours per seed of one row."""
    row = load_row(path)
    cfg = train_config(row, row.seeds[0], runs, device="cpu", workers=0)  # loader in this process: its CPU counts
    timed = replace(cfg, batch_size=batch_size or cfg.batch_size)
    trainer = Trainer(timed)
    trainer.model.train()
    batches = iter(trainer.train_loader)
    for _ in range(WARMUP_STEPS):
        training_step(trainer.net, trainer.loss, trainer.optimizer, trainer.scaler, next(batches), trainer.device,
                      precision=cfg.precision)
    started = time.process_time()
    for _ in range(steps):
        training_step(trainer.net, trainer.loss, trainer.optimizer, trainer.scaler, next(batches), trainer.device,
                      precision=cfg.precision)
    step_cpu = (time.process_time() - started) / steps * cfg.batch_size / timed.batch_size
    val = trainer.data.val
    sample = SceneDataset(val.samples[:EVAL_IMAGES], val.class_names, val.transform)
    started = time.process_time()
    predict_outputs(trainer.model, sample, trainer.device, batch_size=cfg.batch_size * 2, workers=0)
    eval_cpu = (time.process_time() - started) / len(sample)
    steps_per_epoch = len(trainer.data.train) // cfg.batch_size  # full batches only, as training drops the last
    n_val, n_test = len(val), len(trainer.data.test)
    seconds = cfg.epochs * (steps_per_epoch * step_cpu + n_val * eval_cpu) + (n_test + n_val) * eval_cpu
    return {"name": row.name, "seeds": len(row.seeds), "steps_per_epoch": steps_per_epoch, "step_cpu": step_cpu,
            "eval_cpu_ms": 1000 * eval_cpu, "cpu_hours_per_seed": seconds / 3600,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per row")
    parser.add_argument("--batch-size", type=int, help="time steps of this many anchors, scaled to the row's batch")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    print("| row | steps/epoch | CPU s/step | CPU ms/eval image | CPU h/seed | CPU h/row | peak GB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="casd-cost-") as runs:
        for path in args.rows:
            cost = estimate(path, args.steps, Path(runs), args.batch_size)
            print(f"| {cost['name']} | {cost['steps_per_epoch']} | {cost['step_cpu']:.2f} | {cost['eval_cpu_ms']:.1f} "
                  f"| {cost['cpu_hours_per_seed']:.2f} | {cost['cpu_hours_per_seed'] * cost['seeds']:.1f} "
                  f"| {cost['peak_gb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
