"""Figures and tables for docs/RESULTS.md from finished study runs.

    .venv/bin/python experiments/report.py [--runs runs/experiments] [--out docs/images]

Writes ``study_curves.png`` (validation OA and training CE per epoch, mean ± std over seeds)
and prints, as Markdown, the most confused class pairs summed over seeds for CE and CASD.
Only finished seeds are read (``result.json`` present); the test split is only reported here,
never used to choose anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # Debian's mpl_toolkits next to pip's matplotlib: no 3-D axes needed
    warnings.simplefilter("ignore", UserWarning)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

from casd_core.train import METRICS_LOG_NAME, RESULT_NAME

CURVES = {  # row name -> legend label
    "aid20-ce": "CE, 150 px / 10 ep",
    "aid20-cskd": "CS-KD, 150 px / 10 ep",
    "aid20-casd": "CASD, 150 px / 10 ep",
    "aid20-casd-negatives-confusion": "CASD (confusion negatives), 150 px / 10 ep",
    "aid20-224px-ce": "CE, 224 px / 20 ep",
    "aid20-224px-casd": "CASD, 224 px / 20 ep",
}
PAIR_ROWS = ("aid20-ce", "aid20-casd-negatives-confusion", "aid20-224px-ce", "aid20-224px-casd")


def finished_runs(runs: Path, row: str) -> list[Path]:
    return sorted(p.parent for p in (runs / row).glob(f"seed*/{RESULT_NAME}"))


def history(run: Path, key: str) -> np.ndarray:
    return np.array([json.loads(line)[key] for line in (run / METRICS_LOG_NAME).read_text().splitlines()])


def plot_curves(runs: Path, out: Path) -> Path:
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    val_axes, loss_axes = figure.subplots(1, 2)
    for row, label in CURVES.items():
        seeds = finished_runs(runs, row)
        if not seeds:
            continue
        for axes, key in ((val_axes, "val_accuracy"), (loss_axes, "train_ce_anchor")):
            key = key if key in json.loads((seeds[0] / METRICS_LOG_NAME).read_text().splitlines()[0]) else "train_ce"
            values = np.stack([history(run, key) for run in seeds])
            epochs = np.arange(1, values.shape[1] + 1)
            mean, std = values.mean(0), values.std(0)
            line, = axes.plot(epochs, 100 * mean if axes is val_axes else mean, label=f"{label} ({len(seeds)} seeds)",
                              linestyle="--" if "224" in row else "-")
            scale = 100 if axes is val_axes else 1
            axes.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=line.get_color(), alpha=0.15)
    val_axes.set(xlabel="epoch", ylabel="validation OA (%)", title="Validation accuracy (carved from train)",
                 ylim=(80, 100))
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy (label-smoothed)", title="Training CE of the anchors")
    val_axes.legend(fontsize=8, loc="lower right")
    val_axes.grid(alpha=0.3)
    loss_axes.grid(alpha=0.3)
    path = out / "study_curves.png"
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def summed_confusion(runs: Path, row: str) -> tuple[list[str], np.ndarray]:
    total, names = None, []
    for run in finished_runs(runs, row):
        with open(run / "confusion_matrix.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        names = rows[0][1:]
        matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
        total = matrix if total is None else total + matrix
    return names, total


def confused_pairs_table(runs: Path, k: int = 10) -> str:
    """Top-k confusions of the first row, with the same cells counted for the other rows."""
    names, base = summed_confusion(runs, PAIR_ROWS[0])
    others = [summed_confusion(runs, row)[1] for row in PAIR_ROWS[1:]]
    off = base.copy()
    np.fill_diagonal(off, 0)
    cells = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:k], off.shape))[0]
    header = "| true → predicted | " + " | ".join(PAIR_ROWS) + " |"
    lines = [header, "|---" * (len(PAIR_ROWS) + 1) + "|"]
    for i, j in cells:
        counts = [base[i, j], *(m[i, j] for m in others)]
        lines.append(f"| {names[i]} → {names[j]} | " + " | ".join(str(int(c)) for c in counts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    print(f"wrote {plot_curves(args.runs, args.out)}")
    print("\nMost confused pairs, test rows summed over 3 seeds:\n")
    print(confused_pairs_table(args.runs))


if __name__ == "__main__":
    main()
