"""Network-only CPU throughput of the bundled model at its input size and at 150 px.

    .venv/bin/python benchmarks/bench_model.py [--batch-size 64] [--repeats 3]

Random input, inference mode, the process tuned as the predictor tunes it (``prepare_cpu``);
prints images/s for NCHW and channels_last. A speed ratio, not an accuracy: the weights are
the bundled model's at every size.
"""

from __future__ import annotations

import argparse
import time

import torch

from casd_core.package import ModelPackage, default_model_path
from casd_core.runtime import prepare_cpu


def images_per_second(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            model(batch)
    return repeats * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prepare_cpu()
    package = ModelPackage.load(default_model_path())
    model = package.build_model().eval()
    print(f"bundled model: {package.backbone}, input {package.input_size} px, {torch.get_num_threads()} threads\n")
    print("| input px | NCHW images/s | channels_last images/s |\n|---:|---:|---:|")
    for size in sorted({150, package.input_size}):
        batch = torch.randn(args.batch_size, len(package.bands), size, size)
        nchw = images_per_second(model.to(memory_format=torch.contiguous_format), batch, args.repeats)
        last = images_per_second(model.to(memory_format=torch.channels_last),
                                 batch.contiguous(memory_format=torch.channels_last), args.repeats)
        print(f"| {size} | {nchw:.0f} | {last:.0f} |")


if __name__ == "__main__":
    main()
