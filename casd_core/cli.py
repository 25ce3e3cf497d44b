"""The ``casd`` command: train, evaluate, predict and batch, thin faces over casd_core."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from casd_core.errors import CasdError


# --- train / evaluate --------------------------------------------------------------------

def _run_train(args: argparse.Namespace) -> int:
    from casd_core.losses import LossConfig
    from casd_core.train import TrainConfig, train

    loss = LossConfig(method=args.method, temperature=args.temperature, distill_weight=args.distill_weight,
                      label_smoothing=args.label_smoothing, distance=args.distance,
                      detach_partner=not args.no_detach_partner, partner_ce=not args.no_partner_ce,
                      alpha_mode=args.alpha_mode, alpha_init=args.alpha_init, alpha_min=args.alpha_min,
                      alpha_max=args.alpha_max, alpha_target_active=args.alpha_target_active)
    cfg = TrainConfig(
        data_root=args.data, split_csv=args.split, out_dir=args.out, method=args.method,
        backbone=args.backbone, pretrained=None if args.pretrained == "none" else args.pretrained,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, input_size=args.input_size, val_fraction=args.val_fraction,
        seed=args.seed, negatives=args.negatives, loss=loss, subset_per_class=args.subset_per_class,
        package_name=args.package_name, device=args.device, workers=args.workers,
        gsd_m=args.gsd, tile_footprint_m=args.tile_footprint,
    )
    result = train(cfg)
    test = result.metrics.get("test")
    print(f"model package: {result.package_path}")
    print(f"validation OA: {result.metrics['validation']['overall_accuracy']:.4f}")
    if test:
        print(f"test OA: {test['overall_accuracy']:.4f}  kappa: {test['kappa']:.4f}  (n={test['num_samples']})")
    return 0


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a scene classifier (plain CE, CS-KD or CASD)",
        description="Train a scene classifier on a folder of class sub-folders. A validation split is "
                    "carved from the 'train' rows for model selection; the 'test' rows are evaluated once "
                    "at the end. Rerun the same command after an interruption to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder the images (and the CSV paths) live in")
    p.add_argument("--split", type=Path, help="CSV with columns path,label,split (train/test rows); "
                                               "without it every image under --data/<class>/ is training data")
    p.add_argument("--out", type=Path, required=True, help="output folder: model package, metrics log, confusion matrix")
    p.add_argument("--method", choices=["ce", "cskd", "casd"], default="casd", help="training objective")
    p.add_argument("--backbone", default="efficientnet_lite0", help="network architecture (see docs for the list)")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default="imagenet",
                   help="start from ImageNet weights (offline for efficientnet_lite0) or from scratch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="anchors per batch (CASD forwards 3x this many images)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    p.add_argument("--input-size", type=int, default=150, help="image side in pixels fed to the network")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class's train rows held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset-per-class", type=int, help="use at most this many images per class (quick runs)")
    g = p.add_argument_group("CS-KD / CASD distillation")
    g.add_argument("--negatives", choices=["random", "confusion", "centroid"], default="centroid",
                   help="how CASD picks the other-class image: uniformly, or preferring classes the model confuses")
    g.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T of the distilled distributions")
    g.add_argument("--distill-weight", type=float, default=1.0, help="lambda: weight of the distillation loss")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--distance", choices=["kl", "js"], default="kl", help="distance between distributions")
    g.add_argument("--no-detach-partner", action="store_true", help="let gradients flow into the partner branches")
    g.add_argument("--no-partner-ce", action="store_true", help="cross-entropy on the anchor only")
    g.add_argument("--alpha-mode", choices=["fixed", "learnable", "adaptive"], default="learnable",
                   help="the CASD margin: constant, learned within bounds, or learned against its own target")
    g.add_argument("--alpha-init", type=float, default=0.5)
    g.add_argument("--alpha-min", type=float, default=0.0)
    g.add_argument("--alpha-max", type=float, default=2.0)
    g.add_argument("--alpha-target-active", type=float, default=0.1,
                   help="adaptive alpha: share of triplets that should still violate the margin")
    m = p.add_argument_group("package description and hardware")
    m.add_argument("--gsd", type=float, help="nominal ground sample distance of the training images, metres/pixel")
    m.add_argument("--tile-footprint", type=float, help="recommended ground size of one tile at inference, metres")
    m.add_argument("--package-name", default="model.safetensors", help="file name of the model package in --out")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    m.add_argument("--workers", type=int, help="DataLoader worker processes (default: 1 on CPU, up to 8 on CUDA)")
    p.set_defaults(run=_run_train)


def _run_evaluate(args: argparse.Namespace) -> int:
    from casd_core.evaluate import evaluate_package

    report = evaluate_package(args.model, args.data, args.split, split=args.subset, out_dir=args.out,
                              batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['split']} rows of {args.split}: n={report['num_samples']}")
    print(f"overall accuracy {report['overall_accuracy']:.4f}  kappa {report['kappa']:.4f}  macro F1 {report['macro_f1']:.4f}")
    width = max(len(name) for name in report["per_class"])
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in report["per_class"].items():
        print(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    if args.out:
        print(f"wrote {', '.join(report['files'].values())}")
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate a model package on the test rows of a split CSV",
        description="Overall accuracy, Cohen's kappa and per-class precision/recall/F1 of a model package "
                    "on one split (default: the 'test' rows) of a path,label,split CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="model package (.safetensors) written by `casd train`")
    p.add_argument("--data", type=Path, required=True, help="folder the CSV paths are relative to")
    p.add_argument("--split", type=Path, required=True, help="CSV with columns path,label,split")
    p.add_argument("--subset", default="test", help="which split's rows to evaluate")
    p.add_argument("--out", type=Path, help="also write metrics.json, confusion_matrix.csv and .png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.set_defaults(run=_run_evaluate)


# --- predict / batch (inference) -----------------------------------------------------------

def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    pass


def _add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    pass


# --- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd",
        description="Remote-sensing scene classification with Class-Aware Self-Distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_batch_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and exit 2, Ctrl-C exits 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CasdError as exc:
        print(f"casd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"casd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
