"""Issue 14's model selection on the fixed validation carve, and how far apart rows are on it.

    .venv/bin/python experiments/aid20_224v/compare.py ROW.toml ... [--runs runs/experiments]

Selection never looks at the test rows: the row with the highest mean validation OA over its
finished seeds wins, and of its seeds the one with the highest validation OA (the epoch the
package kept). The seeds' records (``results/`` beside the rows) hold their labels for the
carve, which measure the paired noise the carve leaves: for two rows, d is the share of carve
images on which their same-seed models disagree (mean over the seeds both have labels for),
and √(d / n) the std of one pair's OA difference (docs/RESULTS.md, "Fixed validation carve
(issue 14)"). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path

import numpy as np

from casd_core.data import default_data_root
from casd_core.experiment import load_row, seed_record, train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, nargs="+")
    parser.add_argument("--runs", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    data_root = args.data_root or default_data_root()
    rows = [load_row(path) for path in args.rows]
    records = {row.name: {s: seed_record(row, s, args.runs, data_root) for s in row.seeds
                          if row.finished(args.runs, s, data_root)} for row in rows}
    val_oa = {name: {s: r["metrics"]["validation"]["overall_accuracy"] for s, r in done.items()}
              for name, done in records.items()}

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
    cfg = train_config(best, best_seed, args.runs, data_root)
    package = cfg.out_dir / cfg.package_name
    print(f"\nselected: {best.name} (mean val OA {100 * statistics.fmean(val_oa[best.name].values()):.2f} %), "
          f"seed {best_seed}: {package}")
    if not package.is_file():  # docs/RESULTS.md: a lost selected seed is trained again, then the rule reapplied
        print(f"its package is not here: delete its record {best.record_path(best_seed)} (git keeps it), train "
              f"it again (casd experiment {best.path} --seeds {best_seed} --runs {args.runs}), then run this again")

    predictions: dict[tuple[str, int], np.ndarray] = {}
    carves = set()
    for row in ranked:
        for seed, record in records[row.name].items():
            labels = record.get("validation_labels")
            if labels is None:  # a record kept from before labels were recorded
                continue
            carves.add(labels["carve_sha256"])
            predicted, true = np.array(labels["predicted"]), np.array(labels["true"])
            predictions[row.name, seed] = predicted
            replayed = float((predicted == true).mean())
            if abs(replayed - val_oa[row.name][seed]) > 0.5 / len(true):  # the carve or the weights differ
                print(f"warning: {row.name} seed {seed} scores {100 * replayed:.2f} % on the replayed carve, "
                      f"its training recorded {100 * val_oa[row.name][seed]:.2f} %")
    if len(carves) > 1:
        raise SystemExit("these rows were validated on different carves: compare rows of one study")
    n = len(next(iter(predictions.values()), []))
    print(f"\npaired noise on the carve ({n} images): d = share of images two rows' same-seed models "
          "label differently, std = √(d/n)\n")
    print("| row A | row B | seeds | d % | paired std (points) | mean val OA A − B (points) |\n|---|---|---|---|---|---|")
    for a, b in itertools.combinations(ranked, 2):
        common = sorted(s for s in val_oa[a.name] if (a.name, s) in predictions and (b.name, s) in predictions)
        if not common:
            continue
        d = statistics.fmean(float((predictions[a.name, s] != predictions[b.name, s]).mean()) for s in common)
        gap = statistics.fmean(val_oa[a.name][s] - val_oa[b.name][s] for s in common)
        print(f"| {a.name} | {b.name} | {len(common)} | {100 * d:.2f} | {100 * math.sqrt(d / n):.2f} "
              f"| {100 * gap:+.2f} |")


if __name__ == "__main__":
    main()
