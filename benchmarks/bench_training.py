"""Training throughput: a plain CE step vs a CS-KD and a CASD step (same backbone, batch, device),
on CPU in both memory layouts (NCHW, and channels_last as the trainer runs it). With
``--alternatives``, the trainer's steps on CPU in channels_last also with bfloat16 autocast
(``--precision bf16``) and CE steps with ``torch.compile``, the two other speed-ups one would
try there.

CASD forwards and back-propagates three images per anchor (anchor, positive, negative), CS-KD
two; this measures what that costs per anchor and per image, on real AID images held in memory
so that only the step itself is timed. CPU always; CUDA too when present.

    .venv/bin/python benchmarks/bench_training.py [--backbone efficientnet_lite0] [--batch-size 32] [--alternatives]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from casd_core.data import build_transforms, default_data_root, read_image, read_split
from casd_core.losses import LossConfig, build_loss
from casd_core.models import build_model, default_normalization
from casd_core.runtime import prepare_cpu
from casd_core.train import BRANCHES, training_step


def real_batch(batch_size: int, input_size: int, backbone: str) -> dict[str, torch.Tensor]:
    """A triplet batch of real AID images (anchors, same-class positives, other-class negatives)."""
    root = default_data_root() / "aid150"
    splits, _ = read_split(root / "split_20.csv", root)
    train = splits["train"]
    mean, std = default_normalization(backbone, 3)
    transform = build_transforms(input_size, mean, std, train=True)

    anchors = train[:: max(1, len(train) // batch_size)][:batch_size]
    by_class = {}
    for sample in train:
        by_class.setdefault(sample.label, []).append(sample)
    positives = [next(s for s in by_class[a.label] if s.path != a.path) for a in anchors]
    negatives = [by_class[(a.label + 1) % len(by_class)][0] for a in anchors]
    batch = {}
    for name, samples in zip(BRANCHES, (anchors, positives, negatives)):
        batch[name] = torch.stack([transform(read_image(s.path)) for s in samples])
        batch[f"{name}_label"] = torch.tensor([s.label for s in samples])
    return batch


def timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(steps/s over ``steps`` timed steps, seconds of the ``warmup`` steps before them, where
    any compile time lands); CUDA is synchronised so that its queued work is counted."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started), warm


def images_per_second(method: str, batch: dict[str, torch.Tensor], backbone: str, device: torch.device,
                      channels_last: bool, steps: int, warmup: int, precision: str = "auto") -> tuple[float, float]:
    """Anchors/s and images/s of the trainer's own ``training_step`` for ``method``."""
    loss = build_loss(LossConfig(method=method), 30).to(device)
    model = build_model(backbone, 30, pretrained="imagenet").to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    branches = {"ce": 1, "cskd": 2, "casd": 3}[method]
    step_batch = {k: v for k, v in batch.items() if k.split("_")[0] in BRANCHES[:branches]}
    steps_per_s, _ = timed(lambda: training_step(model, loss, optimizer, scaler, step_batch, device,
                                                 precision=precision), steps, warmup, device)
    anchors_per_s = len(batch["anchor"]) * steps_per_s
    return anchors_per_s, anchors_per_s * branches


def cpu_alternatives(batch: dict[str, torch.Tensor], backbone: str, steps: int, warmup: int) -> None:
    """On CPU, channels_last: the trainer's steps in float32 (``auto``) vs bfloat16 autocast,
    then CE steps under ``torch.compile`` (its compile time is in the warm-up)."""
    cpu = torch.device("cpu")
    print(f"\n{'CPU, channels_last':<20}{'fp32 images/s':>15}{'bf16 images/s':>15}{'bf16 vs fp32':>14}")
    for method in ("ce", "cskd", "casd"):
        fp32, bf16 = (images_per_second(method, batch, backbone, cpu, True, steps, warmup, precision)[1]
                      for precision in ("auto", "bf16"))
        print(f"{method:<20}{fp32:>15.1f}{bf16:>15.1f}{bf16 / fp32:>13.2f}x")
    images, labels = batch["anchor"], batch["anchor_label"]
    print(f"\n{'CE step, CPU, channels_last':<32}{'images/s':>10}{'warm-up s':>11}{'vs fp32':>9}")
    fp32 = None
    for name in ("fp32", "torch.compile"):
        model = build_model(backbone, 30, pretrained="imagenet").train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if name == "torch.compile" else model

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps_per_s, warm = timed(step, steps, warmup, cpu)
        rate = steps_per_s * len(images)
        fp32 = fp32 or rate
        print(f"{name:<32}{rate:>10.1f}{warm:>11.1f}{rate / fp32:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=150)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--alternatives", action="store_true",
                        help="also time the steps on CPU with bfloat16 autocast, and CE steps with torch.compile")
    args = parser.parse_args()
    prepare_cpu()  # as the trainer does: without the malloc tuning CPU steps run ~1.6x slower
    batch = real_batch(args.batch_size, args.input_size, args.backbone)
    runs = [(torch.device("cpu"), False), (torch.device("cpu"), True)]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), True))
    print(f"backbone {args.backbone}, batch {args.batch_size} anchors, {args.input_size} px, "
          f"{args.steps} timed steps after {args.warmup} warm-up, torch threads {torch.get_num_threads()}")
    print(f"{'device':<8}{'layout':<15}{'method':<8}{'anchors/s':>11}{'images/s':>10}{'anchor cost vs CE':>19}"
          f"{'vs NCHW':>9}")
    nchw_rates: dict[str, float] = {}
    for device, channels_last in runs:
        ce_rate = None
        layout = "channels_last" if channels_last else "NCHW"
        for method in ("ce", "cskd", "casd"):
            anchors_s, images_s = images_per_second(method, batch, args.backbone, device, channels_last,
                                                    args.steps, args.warmup)
            ce_rate = ce_rate or anchors_s
            if device.type == "cpu" and not channels_last:
                nchw_rates[method] = anchors_s
            speedup = f"{anchors_s / nchw_rates[method]:.2f}x" if device.type == "cpu" else ""
            print(f"{device.type:<8}{layout:<15}{method:<8}{anchors_s:>11.1f}{images_s:>10.1f}"
                  f"{ce_rate / anchors_s:>18.2f}x{speedup:>9}")
    if args.alternatives:
        cpu_alternatives(batch, args.backbone, args.steps, args.warmup)


if __name__ == "__main__":
    main()
