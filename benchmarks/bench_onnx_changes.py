"""Each of the four CPU speed changes behind the ONNX table, before vs after, in one run.

    .venv/bin/python benchmarks/bench_onnx_changes.py

1. pads folded into the convolutions: onnxruntime ms per batch of 32 (224 px), fp32 and int8
   exports of the bundled model with and without the fold, and the share of the run the
   profiler gives Pad and the ops around it;
2. no spinning onnxruntime threads: the int8 pipeline (``classify_raster`` on the 8,000²
   mosaic) with spinning allowed vs not;
3. the plan's decimated read of that JPEG mosaic without overviews, with GDAL's implicit JPEG
   overviews off (rasterio's default) vs on;
4. torch: the library's same-padding forward (``F.pad`` first) vs ours, model only.

Rounds alternate the two sides of each change (median of ``--rounds``), so a passing load on
the shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch

from casd_core.onnx.metadata import INPUT_NAME

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
BATCH = 32


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median of each side's value, the sides run in turn ``rounds`` times."""
    values: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            values[name].append(run())
    return {name: statistics.median(v) for name, v in values.items()}


def session(path: Path, spinning: bool = False, profile: bool = False):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_profiling = profile
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ms_per_batch(path: Path) -> Callable[[], float]:
    runner, batch = session(path), np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224)).astype(np.float32)
    runner.run(None, {INPUT_NAME: batch})

    def run() -> float:
        started = time.perf_counter()
        for _ in range(3):
            runner.run(None, {INPUT_NAME: batch})
        return (time.perf_counter() - started) / 3 * 1000

    return run


def op_shares(path: Path) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type over 3 batches (its profiler)."""
    runner = session(path, profile=True)
    batch = np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224)).astype(np.float32)
    for _ in range(3):
        runner.run(None, {INPUT_NAME: batch})
    trace = Path(runner.end_profiling())
    times: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(times.values())
    return {op: 100 * t / total for op, t in times.most_common()}


def fold(cache: Path, rounds: int) -> None:
    from casd_core.onnx.export import export_onnx
    from casd_core.onnx.quantize import CalibrationConfig
    from bench_onnx import AID

    paths = {}
    for folded in (False, True):
        for precision in ("fp32", "int8"):
            path = cache / f"changes_{precision}_{'folded' if folded else 'pads'}.onnx"
            unfolded = mock.patch("casd_core.onnx.export._fold_pads_into_convs", lambda model: None)
            with contextlib.nullcontext() if folded else unfolded:
                options = {"int8": True, "calibration": CalibrationConfig(AID / "split_20.csv")} if precision == "int8" else {}
                paths[precision, folded] = export_onnx(None, path, **options)
    times = alternate({f"{p} {'folded' if f else 'with pads'}": ms_per_batch(path) for (p, f), path in paths.items()},
                      rounds)
    print("1. ms per batch of 32: " + ", ".join(f"{name} {ms:.0f}" for name, ms in times.items()))
    for precision in ("fp32", "int8"):
        shares = op_shares(paths[precision, False])
        print(f"   {precision} with pads, % of kernel time: " + ", ".join(f"{op} {share:.1f}"
                                                                      for op, share in list(shares.items())[:5]))


def spinning(cache: Path, raster: Path, rounds: int) -> None:
    from bench_onnx import exports

    from casd_core.inference import InferenceConfig, Predictor, classify_raster
    from casd_core.tiling import TilingConfig

    path = exports(cache)["int8"]
    tiling, inference = TilingConfig(tile_size=224, unit="px"), InferenceConfig(batch_size=BATCH, device="cpu")
    predictors = {name: Predictor.from_package(path, "cpu") for name in ("spinning", "not spinning")}
    predictors["spinning"].session = session(path, spinning=True)
    with tempfile.TemporaryDirectory() as tmp:
        rates = alternate({name: lambda p=p: classify_raster(raster, Path(tmp) / "out.gpkg", p, tiling,
                                                             inference).tiles_per_second
                           for name, p in predictors.items()}, rounds)
    print("2. int8 pipeline, tiles/s: " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))


def plan_read(raster: Path, rounds: int) -> None:
    import rasterio
    from rasterio.enums import Resampling

    def read(implicit: bool) -> float:
        with rasterio.Env(GTIFF_IMPLICIT_JPEG_OVR=implicit), rasterio.open(raster) as dataset:
            started = time.perf_counter()  # a fresh dataset each time: no cached blocks
            dataset.read((1, 2, 3), out_shape=(3, dataset.height // 8, dataset.width // 8),
                         resampling=Resampling.nearest)
            return time.perf_counter() - started

    seconds = alternate({"implicit overviews off": lambda: read(False), "on": lambda: read(True)}, rounds)
    print("3. plan read of the mosaic at 1/8, s: " + ", ".join(f"{name} {s:.2f}" for name, s in seconds.items()))


def torch_padding(rounds: int) -> None:
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    from casd_core.inference import Predictor
    from casd_core.models.backbones import _same_padding_conv2d

    predictor = Predictor.from_package(None, "cpu")
    convs = [m for m in predictor.model.modules() if isinstance(m, Conv2dDynamicSamePadding)]
    batch = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def rate(cls: type) -> float:
        for module in convs:
            module.__class__ = cls
        predictor.predict(batch)
        started = time.perf_counter()
        for _ in range(3):
            predictor.predict(batch)
        return 3 * BATCH / (time.perf_counter() - started)

    rates = alternate({"F.pad first (library)": lambda: rate(Conv2dDynamicSamePadding),
                       "padding inside the conv": lambda: rate(_same_padding_conv2d())}, rounds)
    print("4. torch model only, tiles/s: " + ", ".join(f"{name} {r:.1f}" for name, r in rates.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=8000, help="side of the JPEG mosaic for 2 and 3, px")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "casd-bench")
    args = parser.parse_args()
    from bench_inference import mosaic

    raster = mosaic(args.size, args.cache)
    fold(args.cache, args.rounds)
    spinning(args.cache, raster, max(2, args.rounds // 2))
    plan_read(raster, args.rounds)
    torch_padding(args.rounds)


if __name__ == "__main__":
    main()
