"""Learning curves of fine-tuning on a new taxonomy (issue 9's study, docs/RESULTS.md).

    nice -n 19 .venv/bin/python experiments/finetune_curve.py [--work runs/finetune_curve]

The real pipeline, as a user runs it: a training map GeoTIFF of split_20 ``train`` images
(12 polygons of 5 cells per class of built-up / water / vegetation / transport, see
tests/test_chips.py's TAXONOMY), `casd chips`, then for every seed, chip count N per class,
start (``--init default`` or ImageNet weights) and method (CE or CASD) a split CSV of N
chips per class (whole polygons, nested: the N = 5 chips are among the N = 10 ones and so
on), `casd train` on all of them for a fixed budget, and `casd predict` on a separate map of
``test`` images (50 cells per class) scored tile by tile. Each finished run appends one JSON
line to WORK/results.jsonl and is skipped on a rerun; each training run is a `casd train`
run folder, so a kill mid-run resumes. ``--report`` prints the Markdown table and draws
docs/images/finetune_curve.png from the results so far.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio.raw
import shapely
import torch

from casd_core.atomic import atomic_output, write_text_atomic
from casd_core.cli import main
from casd_core.package import ModelPackage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_chips import CELL, CRS_UTM, TAXONOMY, X0, Y0  # noqa: E402  (the tests' taxonomy and map builders)
from test_finetune import build_map, tile_accuracy  # noqa: E402

CLASSES = sorted(TAXONOMY)
STRIP = 5  # cells per polygon: a row of 5 cells, so every N of the study is whole polygons
POLYGONS_PER_CLASS = 12  # 60 chips per class: the N = 50 subsets differ between seeds too
TEST_ROWS, TEST_COLS = 20, 10  # the scoring map: 200 cells, 50 per class, shuffled
SIZES = (5, 10, 20, 50)
SEEDS = (0, 1, 2)
INITS = ("default", "imagenet")
METHODS = ("ce", "casd")
# One budget for every run, CE and CASD alike (docs/RESULTS.md says why): about STEPS optimizer
# steps of BATCH anchors whatever N (whole epochs: at N = 50 one epoch is 25 steps), the first
# WARMUP_STEPS warming up, the backbone frozen throughout (only the new head learns), at the
# package's 224 px. CASD forwards 3 images per anchor, CE one.
BUDGET = {"steps": 20, "warmup_steps": 3, "batch_size": 8, "lr": 0.01, "input_size": 224, "backbone": "frozen"}


def schedule(n: int) -> tuple[int, str]:
    """``(epochs, warmup epochs)`` of the budget for N chips in each of the 4 classes."""
    anchors = n * len(CLASSES)
    steps_per_epoch = anchors // BUDGET["batch_size"] if anchors > BUDGET["batch_size"] else 1  # drop_last
    epochs = max(1, round(BUDGET["steps"] / steps_per_epoch))
    warmup = round(BUDGET["warmup_steps"] / steps_per_epoch, 6)
    assert max(1, int(warmup * steps_per_epoch)) == BUDGET["warmup_steps"]  # as casd train counts it
    return epochs, str(warmup)


def train_layout() -> list[list[str]]:
    """Rows of two 5-cell strips; a strip's class differs from every strip it touches, so
    `casd chips` keeps each strip a group of its own (touching polygons of a class join)."""
    rows = POLYGONS_PER_CLASS * len(CLASSES) // 2
    return [[CLASSES[(r + 2 * half) % len(CLASSES)] for half in range(2) for _ in range(STRIP)]
            for r in range(rows)]


def test_layout() -> list[list[str]]:
    order = np.random.default_rng(7).permutation(
        [name for name in CLASSES for _ in range(TEST_ROWS * TEST_COLS // len(CLASSES))])
    return [order[r * TEST_COLS:(r + 1) * TEST_COLS].tolist() for r in range(TEST_ROWS)]


def write_strip_labels(layout: list[list[str]], path: Path) -> Path:
    """One polygon per strip of the training map, class field ``class``."""
    boxes, names = [], []
    for r, row in enumerate(layout):
        for c0 in range(0, len(row), STRIP):
            boxes.append(shapely.box(X0 + CELL * c0, Y0 - CELL * (r + 1), X0 + CELL * (c0 + STRIP), Y0 - CELL * r))
            names.append(row[c0])
    with atomic_output(path) as tmp:
        pyogrio.raw.write(str(tmp), np.array(shapely.to_wkb(boxes), dtype=object), [np.array(names, dtype=object)],
                          ["class"], driver="GPKG", layer="labels", geometry_type="Polygon", crs=CRS_UTM)
    return path


def prepare(work: Path, aid_root: Path) -> dict[str, Any]:
    """The two maps, the labels and the chips (`casd chips`), each made once."""
    work.mkdir(parents=True, exist_ok=True)
    layouts = {"train": train_layout(), "test": test_layout()}
    maps = {}
    for split, layout in layouts.items():
        maps[split] = work / f"{split}_map.tif"
        if not maps[split].is_file():
            with atomic_output(maps[split]) as tmp:
                build_map(aid_root, split, layout, tmp)
    labels = work / "labels.gpkg"
    if not labels.is_file():
        write_strip_labels(layouts["train"], labels)
    chips = work / "chips"
    if not (chips / "split.csv").is_file():  # chips writes split.csv last: without it, redo
        code = main(["chips", str(maps["train"]), "--labels", str(labels), "--class-field", "class", "-o", str(chips),
                     "--tile-size", str(CELL), "--unit", "px", "--test-fraction", "0", "--overwrite", "--quiet"])
        if code:
            raise SystemExit(code)
    return {"maps": maps, "layouts": layouts, "chips": chips}


def nested_subsets(split_csv: Path, seed: int, sizes: tuple[int, ...]) -> dict[int, list[dict[str, str]]]:
    """For each N the chip rows of N chips per class: whole groups (polygons) in an order
    drawn with ``seed``, the last one cut if N is not whole groups, so smaller N are subsets."""
    with split_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for row in sorted(rows, key=lambda r: r["path"]):
        groups[row["label"]][row["group"]].append(row)
    rng = np.random.default_rng(seed)
    ordered = {}
    for label in sorted(groups):
        names = sorted(groups[label])
        ordered[label] = [row for g in rng.permutation(names) for row in groups[label][g]]
    subsets = {}
    for n in sizes:
        if any(len(chips) < n for chips in ordered.values()):
            raise SystemExit(f"fewer than {n} chips in a class: {({k: len(v) for k, v in ordered.items()})}")
        subsets[n] = [row for label in sorted(ordered) for row in ordered[label][:n]]
    return subsets


def write_split(rows: list[dict[str, str]], path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "group"])
            writer.writeheader()
            writer.writerows({"path": r["path"], "label": r["label"], "split": "train", "group": r["group"]}
                             for r in rows)
    return path


def run_one(work: Path, chips: Path, test_map: Path, layout: list[list[str]], split_csv: Path,
            n: int, init: str, method: str, seed: int) -> dict[str, Any]:
    run = work / "runs" / f"n{n:02d}" / f"{init}-{method}" / f"seed{seed}"
    start = ["--init", "default"] if init == "default" else ["--pretrained", "imagenet"]
    started = time.perf_counter()
    epochs, warmup = schedule(n)
    code = main(["train", "--data", str(chips), "--split", str(split_csv), "--out", str(run), *start,
                 "--method", method, "--epochs", str(epochs), "--freeze-epochs", str(epochs),
                 "--warmup-epochs", warmup, "--batch-size", str(BUDGET["batch_size"]), "--lr", str(BUDGET["lr"]),
                 "--input-size", str(BUDGET["input_size"]), "--val-fraction", "0", "--seed", str(seed),
                 "--device", "cpu"])
    if code:
        raise SystemExit(f"casd train failed ({code}) in {run}")
    train_seconds = time.perf_counter() - started
    package = run / "model.safetensors"  # no validation rows: the last epoch's weights
    layer = run / "test_map.gpkg"
    started = time.perf_counter()
    code = main(["predict", str(test_map), "-m", str(package), "-o", str(layer), "--overwrite", "--device", "cpu",
                 "--quiet"])
    if code:
        raise SystemExit(f"casd predict failed ({code}) for {package}")
    predict_seconds = time.perf_counter() - started
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"n": n, "init": init, "method": method, "seed": seed, "accuracy": tile_accuracy(layer, layout),
            "per_class": per_class_accuracy(layer, layout), "train_accuracy_last_epoch": history[-1]["train_accuracy"],
            "train_seconds": round(train_seconds, 1), "epoch_seconds": [round(m["epoch_seconds"], 1) for m in history],
            "predict_seconds": round(predict_seconds, 1), "epochs": epochs, "budget": BUDGET, "threads": torch.get_num_threads(),
            # a fine-tune trains at its start package's own size when asked for the default 224
            "trained_input_size": ModelPackage.load(package).input_size}


def per_class_accuracy(layer: Path, layout: list[list[str]]) -> dict[str, float]:
    meta, _, _, data = pyogrio.raw.read(str(layer), layer=0, read_geometry=False)
    column = dict(zip(meta["fields"], data))
    right: dict[str, list[bool]] = defaultdict(list)
    for name, r, c in zip(column["class_name"], column["row"], column["col"]):
        right[layout[r][c]].append(name == layout[r][c])
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(right.items())}


def read_results(path: Path) -> dict[tuple, dict[str, Any]]:
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["n"], r["init"], r["method"], r["seed"]): r for r in lines}


def run_study(args: argparse.Namespace) -> None:
    work = args.work
    prepared = prepare(work, args.aid_root)
    results_path = work / "results.jsonl"
    done = read_results(results_path)
    other = {json.dumps(r["budget"], sort_keys=True) for r in done.values()} - {json.dumps(BUDGET, sort_keys=True)}
    if other:
        raise SystemExit(f"{results_path} holds runs of another budget ({other}); use another --work")
    # Seed by seed: an unfinished study has every cell of the table with fewer seeds.
    grid = [(seed, n, init, method) for seed in args.seeds for n in args.sizes for init in args.inits
            for method in args.methods]
    for i, (seed, n, init, method) in enumerate(grid):
        if (n, init, method, seed) in done:
            continue
        subsets = nested_subsets(prepared["chips"] / "split.csv", seed, tuple(SIZES))
        split_csv = write_split(subsets[n], work / "splits" / f"seed{seed}_n{n:02d}.csv")
        print(f"[{i + 1}/{len(grid)}] N={n} init={init} method={method} seed={seed}", flush=True)
        result = run_one(work, prepared["chips"], prepared["maps"]["test"], prepared["layouts"]["test"], split_csv,
                         n, init, method, seed)
        done[(n, init, method, seed)] = result
        write_text_atomic("".join(json.dumps(r) + "\n" for r in done.values()), results_path)
        print(f"    test-map accuracy {result['accuracy']:.3f}  (train {result['train_seconds']:.0f} s, "
              f"predict {result['predict_seconds']:.0f} s)", flush=True)


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` in points (of 100), as the rest of docs/RESULTS.md."""
    v = 100 * np.array(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def report(work: Path, figure_path: Path | None) -> None:
    """The Markdown tables (mean ± std over the finished seeds), the timings and the figure."""
    done = read_results(work / "results.jsonl")
    cells: dict[tuple, list[float]] = defaultdict(list)
    for (n, init, method, _), r in sorted(done.items()):
        cells[(n, init, method)].append(r["accuracy"])
    columns = [(init, method) for init in INITS for method in METHODS]
    names = {"default": "AID model", "imagenet": "ImageNet", "ce": "CE", "casd": "CASD"}
    print("| chips per class | " + " | ".join(f"{names[i]}, {names[m]}" for i, m in columns) + " | seeds |")
    print("|---:|" + "---:|" * len(columns) + "---:|")
    for n in SIZES:
        seeds = min((len(cells.get((n, *key), [])) for key in columns))
        row = [mean_std(cells[(n, *key)]) if cells.get((n, *key)) else "–" for key in columns]
        print(f"| {n} | " + " | ".join(row) + f" | {seeds} |")
    # The question: CASD minus CE on the very same chips and seed, per start.
    print("\n| chips per class | CASD − CE, from the AID model | CASD − CE, from ImageNet |")
    print("|---:|---:|---:|")
    for n in SIZES:
        row = []
        for init in INITS:
            diffs = [done[(n, init, "casd", s)]["accuracy"] - done[(n, init, "ce", s)]["accuracy"]
                     for s in SEEDS if (n, init, "casd", s) in done and (n, init, "ce", s) in done]
            row.append(f"{mean_std(diffs)} ({', '.join(f'{100 * d:+.1f}' for d in diffs)})" if diffs else "–")
        print(f"| {n} | " + " | ".join(row) + " |")
    seconds = defaultdict(list)
    for (n, init, method, _), r in done.items():
        seconds[(n, method)].append(r["train_seconds"] + r["predict_seconds"])
    print("\nseconds per run (train + predict), median over inits and seeds:",
          ", ".join(f"N={n} {m}: {np.median(v):.0f}" for (n, m), v in sorted(seconds.items())))
    print(f"total: {sum(r['train_seconds'] + r['predict_seconds'] for r in done.values()) / 60:.1f} min, "
          f"{len(done)} runs")
    if figure_path is not None and cells:
        plot(cells, figure_path)


def plot(cells: dict[tuple, list[float]], path: Path) -> Path:
    with warnings.catch_warnings():  # Debian's mpl_toolkits next to pip's matplotlib: no 3-D axes needed
        warnings.simplefilter("ignore", UserWarning)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    styles = {("default", "ce"): ("tab:blue", "-"), ("default", "casd"): ("tab:orange", "-"),
              ("imagenet", "ce"): ("tab:blue", "--"), ("imagenet", "casd"): ("tab:orange", "--")}
    labels = {"default": "from the AID model", "imagenet": "from ImageNet"}
    for (init, method), (color, line) in styles.items():
        sizes = [n for n in SIZES if cells.get((n, init, method))]
        if not sizes:
            continue
        values = [np.array(cells[(n, init, method)]) * 100 for n in sizes]
        mean = np.array([v.mean() for v in values])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
        seeds = min(len(v) for v in values)
        axes.plot(sizes, mean, color=color, linestyle=line, marker="o",
                  label=f"{method.upper()} {labels[init]} ({seeds} seed{'s' if seeds > 1 else ''})")
        axes.fill_between(sizes, mean - std, mean + std, color=color, alpha=0.12)
    axes.set_xscale("log")
    axes.set_xticks(SIZES, [str(n) for n in SIZES])
    axes.set_xlabel("labelled chips per class (log scale)")
    axes.set_ylabel("tile accuracy on the test map (%)")
    axes.set_title("Fine-tuning on built-up / water / vegetation / transport\n(mean ± std over seeds)")
    axes.set_ylim(50, 100)  # room below the curves for the legend
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "finetune_curve",
                        help="folder of the maps, chips, runs and results.jsonl (default: runs/finetune_curve)")
    parser.add_argument("--aid-root", type=Path, default=REPO.parent / "shared" / "data" / "aid150")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, the machine's cores)")
    parser.add_argument("--report", action="store_true", help="only print the table and draw the figure")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "images" / "finetune_curve.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.report:
        report(arguments.work, arguments.figure)
    else:
        torch.set_num_threads(arguments.threads)
        run_study(arguments)
        report(arguments.work, arguments.figure)
