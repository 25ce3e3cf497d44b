"""Estimate the wall time per seed of study rows from a few timed training steps (issue 14's queue).

    .venv/bin/python experiments/aid20_224v/estimate_cost.py ROW.toml ... [--steps 3] [--batch-size 16]

Each row's seed-0 run is built as ``casd experiment`` builds it (data, loader process, model,
loss, CPU tuning, all the cores torch uses), ``--steps`` training steps are timed after two
warm-up steps, and evaluation on 400 validation images. Both in wall seconds, so run it with
nothing else on the cores (pause the queue: ``kill -STOP -- -<its pgid>``). CPU seconds would not
do: the wall time they map to depends on how well a row's steps use the second core (here wall
≈ 0.77 × the 1-thread CPU time for CASD, 0.87 × for CE), not a constant. ``--batch-size`` times
smaller steps (less memory) and scales them to the row's batch. Per seed: ``epochs × (steps per
epoch × step + validation rows × eval) + (test + validation rows) × eval`` (the final test pass
and the temperature fit). Prints one Markdown row per row file, with this process's peak memory.
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

EVAL_IMAGES = 400  # one validation pass of the fixed carve
WARMUP_STEPS = 2


def estimate(path: Path, steps: int, runs: Path, batch_size: int | None) -> dict[str, float]:
    """Wall seconds per training step (at the row's batch) and per evaluated image, and the
    estimated wall hours per seed of one row."""
    row = load_row(path)
    cfg = train_config(row, row.seeds[0], runs, device="cpu")  # its own loader process, as the run has
    timed = replace(cfg, batch_size=batch_size or cfg.batch_size)
    trainer = Trainer(timed)
    trainer.model.train()
    batches = iter(trainer.train_loader)
    for _ in range(WARMUP_STEPS):
        training_step(trainer.net, trainer.loss, trainer.optimizer, trainer.scaler, next(batches), trainer.device,
                      precision=cfg.precision)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(trainer.net, trainer.loss, trainer.optimizer, trainer.scaler, next(batches), trainer.device,
                      precision=cfg.precision)
    step_s = (time.perf_counter() - started) / steps * cfg.batch_size / timed.batch_size
    val = trainer.data.val
    sample = SceneDataset(val.samples[:EVAL_IMAGES], val.class_names, val.transform)
    started = time.perf_counter()
    predict_outputs(trainer.model, sample, trainer.device, batch_size=cfg.batch_size * 2, workers=trainer.workers)
    eval_s = (time.perf_counter() - started) / len(sample)
    steps_per_epoch = len(trainer.data.train) // cfg.batch_size  # full batches only, as training drops the last
    n_val, n_test = len(val), len(trainer.data.test)
    seconds = cfg.epochs * (steps_per_epoch * step_s + n_val * eval_s) + (n_test + n_val) * eval_s
    return {"name": row.name, "seeds": len(row.seeds), "steps_per_epoch": steps_per_epoch, "step_s": step_s,
            "eval_ms": 1000 * eval_s, "hours_per_seed": seconds / 3600,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per row")
    parser.add_argument("--batch-size", type=int, help="time steps of this many anchors, scaled to the row's batch")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    print("| row | steps/epoch | s/step | ms/eval image | h/seed | h/row | peak GB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="casd-cost-") as runs:
        for path in args.rows:
            cost = estimate(path, args.steps, Path(runs), args.batch_size)
            print(f"| {cost['name']} | {cost['steps_per_epoch']} | {cost['step_s']:.2f} | {cost['eval_ms']:.1f} "
                  f"| {cost['hours_per_seed']:.2f} | {cost['hours_per_seed'] * cost['seeds']:.1f} "
                  f"| {cost['peak_gb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
