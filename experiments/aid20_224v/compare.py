"""Issue 14's model selection on the fixed validation carve, and how far apart rows are on it.

    .venv/bin/python experiments/aid20_224v/compare.py ROW.toml ... [--runs runs/experiments]

Selection never looks at the test rows: the row with the highest mean validation OA over its
finished seeds wins, and of its seeds the one with the highest validation OA (the epoch the
package kept). Every finished package is also run over its carve, to measure the paired noise
the carve leaves: for two rows, d is the share of carve images on which their same-seed models
disagree (mean over the seeds both finished), and √(d / n) the std of one pair's OA difference
(docs/RESULTS.md, "Fixed validation carve (issue 14)"). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path

import numpy as np

from casd_core.calibration import replayed_rows
from casd_core.data import default_data_root
from casd_core.evaluate import evaluation_model, package_dataset, predict_outputs
from casd_core.experiment import Row, load_row, seed_summary, train_config
from casd_core.package import ModelPackage


def carve_predictions(row: Row, seed: int, runs: Path, data_root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The carve's image paths, labels and this seed's predicted labels on them."""
    cfg = train_config(row, seed, runs, data_root)
    package_path = cfg.out_dir / cfg.package_name
    package = ModelPackage.load(package_path)
    rows = replayed_rows(package, package_path, cfg.data_root, cfg.split_csv)
    model, device = evaluation_model(package, package_path)
    out = predict_outputs(model, package_dataset(package, rows.val), device)
    return [str(s.path) for s in rows.val], out.labels, out.predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, nargs="+")
    parser.add_argument("--runs", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    data_root = args.data_root or default_data_root()
    rows = [load_row(path) for path in args.rows]
    finished = {row.name: [s for s in row.seeds if row.finished(args.runs, s, data_root)] for row in rows}
    val_oa = {row.name: {s: seed_summary(row.run_dir(args.runs, s))["val_accuracy"] for s in finished[row.name]}
              for row in rows}

    print("| row | seeds done | val OA % per seed | mean val OA % |\n|---|---|---|---|")
    for row in rows:
        scores = val_oa[row.name]
        mean = f"{100 * statistics.fmean(scores.values()):.2f}" if scores else "—"
        per_seed = ", ".join(f"{s}: {100 * v:.2f}" for s, v in scores.items()) or "—"
        print(f"| {row.name} | {len(scores)}/{len(row.seeds)} | {per_seed} | {mean} |")
    ranked = [row for row in rows if val_oa[row.name]]
    if not ranked:
        print("\nno row has a finished seed yet")
        return
    best = max(ranked, key=lambda row: statistics.fmean(val_oa[row.name].values()))
    best_seed = max(val_oa[best.name], key=val_oa[best.name].get)
    print(f"\nselected: {best.name} (mean val OA {100 * statistics.fmean(val_oa[best.name].values()):.2f} %), "
          f"seed {best_seed}: {best.run_dir(args.runs, best_seed)}")

    predictions: dict[tuple[str, int], np.ndarray] = {}
    carve: list[str] | None = None
    for row in ranked:
        for seed in finished[row.name]:
            paths, labels, predicted = carve_predictions(row, seed, args.runs, data_root)
            if carve is not None and paths != carve:
                raise SystemExit(f"{row.name} seed {seed} was validated on another carve: compare rows of one study")
            carve = paths
            predictions[row.name, seed] = predicted
            replayed = float((predicted == labels).mean())
            if abs(replayed - val_oa[row.name][seed]) > 0.5 / len(labels):  # the carve or the weights differ
                print(f"warning: {row.name} seed {seed} scores {100 * replayed:.2f} % on the replayed carve, "
                      f"its training recorded {100 * val_oa[row.name][seed]:.2f} %")
    n = len(carve or [])
    print(f"\npaired noise on the carve ({n} images): d = share of images two rows' same-seed models "
          "label differently, std = √(d/n)\n")
    print("| row A | row B | seeds | d % | paired std (points) | mean val OA A − B (points) |\n|---|---|---|---|---|---|")
    for a, b in itertools.combinations(ranked, 2):
        common = sorted(set(finished[a.name]) & set(finished[b.name]))
        if not common:
            continue
        d = statistics.fmean(float((predictions[a.name, s] != predictions[b.name, s]).mean()) for s in common)
        gap = statistics.fmean(val_oa[a.name][s] - val_oa[b.name][s] for s in common)
        print(f"| {a.name} | {b.name} | {len(common)} | {100 * d:.2f} | {100 * math.sqrt(d / n):.2f} "
              f"| {100 * gap:+.2f} |")


if __name__ == "__main__":
    main()
