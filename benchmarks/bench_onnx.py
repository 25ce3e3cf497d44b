"""fp32 torch vs fp32 onnxruntime vs int8 onnxruntime: tiles/s and accuracy, side by side.

    .venv/bin/python benchmarks/bench_onnx.py                   # full: all 7,999 test rows
    .venv/bin/python benchmarks/bench_onnx.py --per-class 20    # a quicker accuracy look

The bundled default model (EfficientNet-Lite0, 224 px, 30 AID classes) three ways: torch fp32
(the tuned model-only bound: channels_last, tuned malloc, inference mode), its fp32 ONNX export
and its int8 export (``casd export --int8``, calibrated on 10 train rows per class of
split_20.csv), all with the same threads (the usable cores) in one process:

(a) model only: one in-memory batch of 32 at 224 px, repeated; rounds interleaved across the
    three (median of ``--rounds``), so a passing load on the shared machine hits all alike;
(b) pipeline: ``classify_raster`` end to end (background reads, normalisation, model, GeoPackage
    written) on a mosaic of ``test_tiled.tif`` with 224-px tiles read 1:1, batch 32;
(c) accuracy: OA (and agreement with torch) on the test rows of split_20.csv, every model fed
    the very same normalised batches (one decoding pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
AID = Path(os.environ.get("CASD_DATA", REPO.parent / "shared" / "data")) / "aid150"
BATCH = 32


def exports(cache: Path) -> dict[str, Path]:
    """The default model's fp32 and int8 exports, cached under a digest of the exporter's code
    and the model file, so a changed export is never measured from a stale file."""
    import hashlib

    from casd_core.onnx import export, quantize
    from casd_core.onnx.export import export_onnx
    from casd_core.onnx.quantize import CalibrationConfig
    from casd_core.package import default_model_path

    digest = hashlib.sha256()
    for source in (Path(export.__file__), Path(quantize.__file__), default_model_path()):
        digest.update(source.read_bytes())
    key = digest.hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": cache / f"default_fp32_{key}.onnx", "int8": cache / f"default_int8_{key}.onnx"}
    if not paths["fp32"].is_file():
        export_onnx(None, paths["fp32"])
    if not paths["int8"].is_file():
        export_onnx(None, paths["int8"], int8=True, calibration=CalibrationConfig(AID / "split_20.csv"))
    return paths


def predictors(paths: dict[str, Path]) -> dict[str, object]:
    from casd_core.inference import Predictor
    from casd_core.package import default_model_path

    return {"torch fp32": Predictor.from_package(default_model_path(), "cpu"),
            "onnxruntime fp32": Predictor.from_package(paths["fp32"], "cpu"),
            "onnxruntime int8": Predictor.from_package(paths["int8"], "cpu")}


def model_only(models: dict[str, object], rounds: int, repeats: int) -> dict[str, float]:
    batch = np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224)).astype(np.float32)
    staged = {name: (torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
                     if name.startswith("torch") else batch) for name in models}
    return interleaved_rates(models, staged, rounds, repeats)


def interleaved_rates(models: dict, staged: dict, rounds: int, repeats: int) -> dict:
    """Median tiles/s of each model on its ``staged`` batch (of ``BATCH``), in rounds that
    interleave the models, so a passing load on the shared machine hits all alike."""
    rates: dict = {key: [] for key in models}
    for key, model in models.items():
        model.predict(staged[key])  # warm-up
    for _ in range(rounds):
        for key, model in models.items():
            started = time.perf_counter()
            for _ in range(repeats):
                model.predict(staged[key])
            rates[key].append(repeats * BATCH / (time.perf_counter() - started))
    return {key: statistics.median(values) for key, values in rates.items()}


def pipeline(models: dict, raster: Path, rounds: int) -> dict:
    """Median ``(tiles/s, tiles)`` of ``classify_raster`` end to end with each model, 224-px
    tiles read 1:1, rounds interleaving the models."""
    from casd_core.inference import InferenceConfig, classify_raster
    from casd_core.tiling import TilingConfig

    tiling, inference = TilingConfig(tile_size=224, unit="px"), InferenceConfig(batch_size=BATCH, device="cpu")
    rates: dict = {key: [] for key in models}
    tiles = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for key, model in models.items():
                summary = classify_raster(raster, Path(tmp) / "out.gpkg", model, tiling, inference)
                rates[key].append(summary.tiles_per_second)
                tiles = summary.tiles
    return {key: (statistics.median(values), tiles) for key, values in rates.items()}


def accuracy(models: dict[str, object], per_class: int | None) -> tuple[dict[str, float], dict[str, float], int]:
    from collections import Counter

    from casd_core.data import SceneDataset, build_transforms, read_split

    package = models["torch fp32"].package
    splits, class_names = read_split(AID / "split_20.csv", AID)
    rows, taken = [], Counter()
    for sample in splits["test"]:
        if per_class is None or taken[sample.label] < per_class:
            taken[sample.label] += 1
            rows.append(sample)
    dataset = SceneDataset(rows, class_names, build_transforms(package.input_size, package.mean, package.std, False),
                           value_scale=package.value_scale)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=1)
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in models}
    labels = []
    for x, y in loader:
        labels.append(y.numpy())
        for name, model in models.items():
            staged = x.contiguous(memory_format=torch.channels_last) if name.startswith("torch") else x.numpy()
            predictions[name].append(np.asarray(model.predict(staged)).argmax(1))
    truth = np.concatenate(labels)
    predicted = {name: np.concatenate(values) for name, values in predictions.items()}
    oa = {name: float((values == truth).mean()) for name, values in predicted.items()}
    agree = {name: float((values == predicted["torch fp32"]).mean()) for name, values in predicted.items()}
    return oa, agree, len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, help="test rows per class (default: all 7,999)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a); (b) runs 3")
    parser.add_argument("--repeats", type=int, default=4, help="batches per round of (a)")
    parser.add_argument("--size", type=int, default=3000, help="side of the mosaic for (b), px")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "casd-bench")
    args = parser.parse_args()
    from bench_inference import mosaic

    from casd_core.runtime import cpu_threads

    models = predictors(exports(args.cache))
    raster = mosaic(args.size, args.cache)
    print(f"bundled model, 224 px, batch {BATCH}, {cpu_threads()} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, load average {os.getloadavg()[0]:.2f} at the start\n")
    bound = model_only(models, args.rounds, args.repeats)
    print("(a) " + ", ".join(f"{name} {rate:.1f}" for name, rate in bound.items()), flush=True)
    piped = pipeline(models, raster, 3)
    print("(b) " + ", ".join(f"{name} {rate:.1f}" for name, (rate, _) in piped.items()), flush=True)
    oa, agree, n = accuracy(models, args.per_class)
    base = bound["torch fp32"]
    tiles = next(iter(piped.values()))[1]
    print(f"\n| model | (a) model only, tiles/s | (b) pipeline, tiles/s ({tiles} tiles) | (b) / torch bound "
          f"| OA, {n} test rows | agrees with torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        print(f"| {name} | {bound[name]:.1f} | {piped[name][0]:.1f} | {piped[name][0] / base:.2f}× "
              f"| {100 * oa[name]:.2f} % | {100 * agree[name]:.2f} % |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
