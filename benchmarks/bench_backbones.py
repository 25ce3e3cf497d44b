"""CPU tiles/s of the candidate default models: EfficientNet-Lite0 at 224 px (today's default)
vs Lite2 at its native 260 px, with torch and with onnxruntime, in one run.

    .venv/bin/python benchmarks/bench_backbones.py [--rounds 3] [--size 3000]

Issue 14 picks the default model on accuracy *and* speed; speed does not depend on the trained
weights, so each candidate is a 30-class package of ImageNet weights (random head), saved and
exported to fp32 ONNX as ``casd export`` does. (a) model only: one in-memory batch of 32,
repeated, rounds interleaved across the candidates (median); (b) pipeline: ``classify_raster``
end to end on a mosaic of ``test_tiled.tif`` with the same grid of 224-px tiles for every
candidate (Lite2 resamples each tile to 260 px), so a tile is the same map area throughout.
The last column is each candidate's pipeline rate over Lite0's on the same backend (the
issue's 0.7× bar).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_onnx import BATCH, interleaved_rates, pipeline  # noqa: E402 (the path above)
CANDIDATES = [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)]


def candidate_packages(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``name → (package, fp32 ONNX export)`` for every candidate, written into ``folder``."""
    from casd_core.models import build_model, default_normalization
    from casd_core.onnx.export import export_onnx
    from casd_core.package import ModelPackage, default_class_colors, default_model_path

    classes = ModelPackage.load(default_model_path()).class_names
    files = {}
    for backbone, size in CANDIDATES:
        torch.manual_seed(0)
        mean, std = default_normalization(backbone, 3)
        package = ModelPackage(backbone=backbone, class_names=classes, class_colors=default_class_colors(classes),
                               bands=["red", "green", "blue"], input_size=size, mean=mean, std=std,
                               state_dict=build_model(backbone, len(classes), pretrained="imagenet").state_dict())
        name = f"{backbone.removeprefix('efficientnet_')} {size} px"
        path = package.save(folder / f"{backbone}_{size}.safetensors")
        files[name] = (path, export_onnx(path, path.with_suffix(".onnx")))
    return files


def model_only(models: dict[tuple[str, str], object], rounds: int, repeats: int) -> dict[tuple[str, str], float]:
    rng = np.random.default_rng(0)
    staged = {}
    for (name, backend), model in models.items():
        batch = rng.standard_normal((BATCH, 3, model.input_size, model.input_size)).astype(np.float32)
        staged[name, backend] = (torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
                                 if backend == "torch" else batch)
    return interleaved_rates(models, staged, rounds, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a) and (b)")
    parser.add_argument("--repeats", type=int, default=3, help="batches per round of (a)")
    parser.add_argument("--size", type=int, default=3000, help="side of the mosaic for (b), px")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "casd-bench")
    args = parser.parse_args()
    from bench_inference import mosaic

    from casd_core.inference import Predictor
    from casd_core.runtime import cpu_threads

    raster = mosaic(args.size, args.cache)
    with tempfile.TemporaryDirectory(prefix="casd-backbones-") as folder:
        files = candidate_packages(Path(folder))
        models = {(name, backend): Predictor.from_package(path if backend == "torch" else onnx, "cpu")
                  for name, (path, onnx) in files.items() for backend in ("torch", "onnxruntime")}
        print(f"batch {BATCH}, {cpu_threads()} threads, torch {torch.__version__}, onnxruntime "
              f"{__import__('onnxruntime').__version__}, load average {os.getloadavg()[0]:.2f} at the start\n")
        bound = model_only(models, args.rounds, args.repeats)
        piped = pipeline(models, raster, args.rounds)  # (tiles/s, tiles) per model
    tiles = next(iter(piped.values()))[1]
    first = next(iter(files))
    print(f"| model | backend | (a) model only, tiles/s | (b) pipeline, tiles/s ({tiles} tiles) "
          f"| (b) vs {first}, same backend |")
    print("|---|---|---:|---:|---:|")
    for name, backend in models:
        rate = piped[name, backend][0]
        print(f"| {name} | {backend} | {bound[name, backend]:.1f} | {rate:.1f} | {rate / piped[first, backend][0]:.2f}× |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
