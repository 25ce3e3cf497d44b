"""``casd train``, ``casd evaluate``, ``casd calibrate`` and ``casd experiment``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from casd_core.cli.common import add_command, default_of, parse_bands
from casd_core.errors import CasdError, param
from casd_core.losses import LossConfig
from casd_core.train import PRECISIONS, TrainConfig


def _run_train(args: argparse.Namespace) -> int:
    from casd_core.distributed import launched_rank
    from casd_core.train import train

    loss = LossConfig(method=args.method, temperature=args.temperature, distill_weight=args.distill_weight,
                      label_smoothing=args.label_smoothing, distance=args.distance,
                      detach_partner=args.detach_partner, partner_ce=args.partner_ce,
                      alpha_mode=args.alpha_mode, alpha_init=args.alpha_init, alpha_min=args.alpha_min,
                      alpha_max=args.alpha_max, alpha_target_active=args.alpha_target_active,
                      distill_schedule=args.distill_schedule)
    cfg = TrainConfig(
        data_root=args.data_root, split_csv=args.split_csv, out_dir=args.out_dir, method=args.method,
        backbone=args.backbone, pretrained=None if args.pretrained == "none" else args.pretrained,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, input_size=args.input_size, val_fraction=args.val_fraction,
        seed=args.seed, val_seed=args.val_seed, negatives=args.negatives, loss=loss,
        subset_per_class=args.subset_per_class, package_name=args.package_name, device=args.device,
        workers=args.workers,
        bands=parse_bands(args.bands), value_scale=args.value_scale, gsd_m=args.gsd_m,
        tile_footprint_m=args.tile_footprint_m, init=args.init, freeze_epochs=args.freeze_epochs,
        precision=args.precision,
    )
    result = train(cfg)
    if launched_rank() != 0:  # under torchrun every rank returns the result; rank 0 reports it
        return 0
    test = result.metrics.get("test")
    print(f"model package: {result.package_path}")
    validation = result.metrics["validation"]
    if validation["overall_accuracy"] is None:
        print(f"no validation rows: the model is the last epoch's ({validation['best_epoch']})")
    else:
        print(f"validation OA: {validation['overall_accuracy']:.4f}")
    if test:
        print(f"test OA: {test['overall_accuracy']:.4f}  kappa: {test['kappa']:.4f}  (n={test['num_samples']})")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "train", _run_train, "train a scene classifier (plain CE, CS-KD or CASD)",
        "Train a scene classifier on a folder of class sub-folders (or a `casd chips` folder). A "
        "validation split is carved from the 'train' rows for model selection (whole spatial groups "
        "when the CSV has a 'group' column); the 'test' rows are evaluated once at the end. --init "
        "fine-tunes a model package on your classes. Rerun the same command after an interruption "
        "to resume.")
    t, loss = (lambda name: default_of(TrainConfig, name)), (lambda name: default_of(LossConfig, name))
    p.add_argument("--data", dest="data_root", type=Path, required=True,
                   help="folder the images (and the CSV paths) live in")
    p.add_argument("--split", dest="split_csv", type=Path,
                   help="CSV with columns path,label,split (train/test/val rows) and optionally group "
                        "(as `casd chips` writes it); "
                        "without it every image under --data/<class>/ is training data")
    p.add_argument("--out", dest="out_dir", type=Path, required=True,
                   help="output folder: model package, metrics log, confusion matrix")
    p.add_argument("--method", choices=["ce", "cskd", "casd"], default=t("method"), help="training objective")
    p.add_argument("--backbone", default=t("backbone"),
                   help="network architecture (see docs for the list); a fine-tune (--init) trains its model's")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default=t("pretrained") or "none",
                   help="start from ImageNet weights (offline for the efficientnet_lite backbones) or from scratch "
                        "(not used with --init)")
    p.add_argument("--epochs", type=int, default=t("epochs"), help="passes over the training rows")
    p.add_argument("--batch-size", type=int, default=t("batch_size"),
                   help="anchors per batch (CASD forwards 3x this many images)")
    p.add_argument("--lr", type=float, default=t("lr"), help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=t("weight_decay"), help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=t("warmup_epochs"),
                   help="linear warm-up before the cosine decay")
    p.add_argument("--input-size", type=int, default=t("input_size"),
                   help="image side in pixels fed to the network (a fine-tune, --init, trains at its model's "
                        "unless this names another than the default)")
    p.add_argument("--val-fraction", type=float, default=t("val_fraction"),
                   help="share of each class's train rows held out for validation")
    p.add_argument("--seed", type=int, default=t("seed"),
                   help="seed of the sampler, augmentation and weights (and of the validation carve without "
                        "--val-seed)")
    p.add_argument("--val-seed", type=int, default=t("val_seed"),
                   help="draw the validation carve with this seed instead of --seed, so that runs of every seed "
                        "validate on the same images (default: --seed)")
    p.add_argument("--subset-per-class", type=int, help="use at most this many images per class (quick runs)")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--init", metavar="MODEL", default=t("init"),
                   help="fine-tune: start from the backbone of this model package (.safetensors; 'default': "
                        "the embedded model) with a new head for these classes, instead of --pretrained weights")
    f.add_argument("--freeze-epochs", type=int, default=t("freeze_epochs"), metavar="N",
                   help="keep the backbone frozen (weights and batch-norm statistics) for the first N epochs; "
                        "only the head learns then, several times faster")
    g = p.add_argument_group("CS-KD / CASD distillation")
    g.add_argument("--negatives", choices=["random", "confusion", "centroid"], default=t("negatives"),
                   help="how CASD picks the other-class image: uniformly, or preferring classes the model confuses")
    g.add_argument("--temperature", type=float, default=loss("temperature"),
                   help="softmax temperature T of the distilled distributions")
    g.add_argument("--distill-weight", type=float, default=loss("distill_weight"),
                   help="lambda: weight of the distillation loss")
    g.add_argument("--distill-schedule", choices=["constant", "cosine"], default=loss("distill_schedule"),
                   help="lambda over training: constant, or decayed to 0 along a half cosine of the steps done")
    g.add_argument("--label-smoothing", type=float, default=loss("label_smoothing"),
                   help="label smoothing of the cross-entropy terms")
    g.add_argument("--distance", choices=["kl", "js"], default=loss("distance"),
                   help="distance between distributions")
    g.add_argument("--detach-partner", action=argparse.BooleanOptionalAction, default=loss("detach_partner"),
                   help="treat the partner branches as fixed teachers (no gradient through them)")
    g.add_argument("--partner-ce", action=argparse.BooleanOptionalAction, default=loss("partner_ce"),
                   help="cross-entropy on the partner images too, not only the anchor")
    g.add_argument("--alpha-mode", choices=["fixed", "learnable", "adaptive"], default=loss("alpha_mode"),
                   help="the CASD margin: constant, learned within bounds, or learned against its own target")
    g.add_argument("--alpha-init", type=float, default=loss("alpha_init"), help="initial (or fixed) margin alpha")
    g.add_argument("--alpha-min", type=float, default=loss("alpha_min"), help="lower bound of a learned alpha")
    g.add_argument("--alpha-max", type=float, default=loss("alpha_max"), help="upper bound of a learned alpha")
    g.add_argument("--alpha-target-active", type=float, default=loss("alpha_target_active"),
                   help="adaptive alpha: share of triplets that should still violate the margin")
    m = p.add_argument_group("imagery, package description and hardware")
    m.add_argument("--bands", help="1-based bands of multi-band GeoTIFF chips to train on, e.g. 1,2,3,4 "
                                   "(default: all bands)")
    m.add_argument("--value-scale", type=float,
                   help="divide pixel values by this to get [0, 1] (default 255 for uint8; required for uint16)")
    m.add_argument("--gsd", dest="gsd_m", type=float,
                   help="ground size of one network input pixel, metres (default on a `casd chips` folder: "
                        "the chips' footprint / --input-size; else unknown)")
    m.add_argument("--tile-footprint", dest="tile_footprint_m", type=float,
                   help="recommended ground size of one tile at inference, metres (default: the chips' footprint "
                        "on a `casd chips` folder, else the --init model's)")
    m.add_argument("--package-name", default=t("package_name"), help="file name of the model package in --out")
    m.add_argument("--device", default=t("device"), help="auto (CUDA when present), cpu, cuda or cuda:N")
    m.add_argument("--workers", type=int, help="DataLoader worker processes (default: 1 on CPU, up to 8 on CUDA)")
    m.add_argument("--precision", choices=PRECISIONS, default=t("precision"),
                   help="arithmetic of the training forward passes: auto (float16 mixed precision on CUDA, "
                        "float32 elsewhere), fp32, or bf16 (bfloat16 autocast on any device; measure before "
                        "using it on a CPU: it was no faster there in docs/BENCHMARKS.md); evaluation is float32 "
                        "either way")


def _run_evaluate(args: argparse.Namespace) -> int:
    from casd_core.evaluate import evaluate_package

    report = evaluate_package(args.model, args.data_root, args.split_csv, split=args.subset,
                              out_dir=args.out_dir, batch_size=args.batch_size, device=args.device,
                              tta=args.tta)
    if args.json:
        print(json.dumps(report))
        return 0
    views = "8 views per image (test-time augmentation)" if report["tta"] else "1 view per image"
    print(f"{report['split']} rows of {args.split_csv}: n={report['num_samples']}, {views}, "
          f"{report['images_per_s']:.1f} images/s")
    print(f"overall accuracy {report['overall_accuracy']:.4f}  kappa {report['kappa']:.4f}  macro F1 {report['macro_f1']:.4f}")
    print(f"calibration error (ECE) {report['ece']:.4f} at temperature {report['temperature']:.3f}, "
          f"{report['ece_uncalibrated']:.4f} at 1")
    width = max(len(name) for name in report["per_class"])
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in report["per_class"].items():
        print(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    if args.out_dir:
        print(f"wrote {', '.join(report['files'].values())}")
    return 0


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "evaluate", _run_evaluate, "evaluate a model package on the test rows of a split CSV",
        "Overall accuracy, Cohen's kappa and per-class precision/recall/F1 of a model package "
        "on one split (default: the 'test' rows) of a path,label,split CSV.")
    p.add_argument("model", type=Path, help="model package (.safetensors) written by `casd train`, or its "
                                            "`casd export` (.onnx, run in onnxruntime)")
    p.add_argument("--data", dest="data_root", type=Path, required=True,
                   help="folder the CSV paths are relative to")
    p.add_argument("--split", dest="split_csv", type=Path, required=True,
                   help="CSV with columns path,label,split")
    p.add_argument("--subset", default="test", help="which split's rows to evaluate")
    p.add_argument("--out", dest="out_dir", type=Path,
                   help="also write metrics.json, confusion_matrix.csv and .png here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--tta", action="store_true",
                   help="average the scores over the 8 flips and right-angle turns of each image (8x the time)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def _run_calibrate(args: argparse.Namespace) -> int:
    from casd_core.calibration import calibrate_package

    report = calibrate_package(args.model, args.data_root, args.split_csv, args.out_path,
                               batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(report))
        return 0
    val, test = report["validation"], report.get("test")
    print(f"temperature {report['temperature']:.4f}, fitted on the {val['num_samples']} validation rows "
          f"(OA {val['overall_accuracy']:.4f})")
    print(f"validation ECE {val['ece_before']:.4f} -> {val['ece_after']:.4f}   "
          f"NLL {val['nll_before']:.4f} -> {val['nll_after']:.4f}")
    if test:
        print(f"test ECE {test['ece_uncalibrated']:.4f} -> {test['ece']:.4f}   "
              f"NLL {test['nll_uncalibrated']:.4f} -> {test['nll']:.4f}   "
              f"(n={test['num_samples']}, OA {test['overall_accuracy']:.4f}, unchanged)")
    stats = report["pixel_stats"]
    print("training pixels per band (raw): " + ", ".join(
        f"{lo:g}-{hi:g} (mean {mean:.1f})" for lo, hi, mean in zip(stats["low"], stats["high"], stats["mean"])))
    print(f"model package: {report['model']}")
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "calibrate", _run_calibrate, "fit a model package's softmax temperature on its validation rows",
        "Re-package a trained model with calibrated scores: a temperature (Guo et al. 2017) fitted "
        "on the same validation rows its training carved from the 'train' rows (its recorded seed "
        "and validation share; never a test row), and the statistics of its training pixels. The "
        "weights and therefore every label stay the same; prints the calibration error (ECE) "
        "before and after on the validation and test rows.")
    p.add_argument("model", type=Path, help="model package (.safetensors) written by `casd train`")
    p.add_argument("--data", dest="data_root", type=Path, required=True,
                   help="the folder the model was trained from (the CSV paths are relative to it)")
    p.add_argument("--split", dest="split_csv", type=Path,
                   help="the CSV the model was trained with (path,label,split); without it, as for "
                        "`casd train`, the class sub-folders of --data")
    p.add_argument("-o", "--out", dest="out_path", type=Path, required=True,
                   help="the calibrated package (.safetensors); may be MODEL itself, replaced atomically")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def _run_experiment(args: argparse.Namespace) -> int:
    from casd_core.experiment import evaluate_tta, load_row, run_parallel, run_row, summary_table

    rows = [load_row(path) for path in args.rows]
    if args.seeds is not None:
        for row in rows:
            row.seeds = args.seeds
    if args.parallel < 1:
        raise CasdError(f"{param('parallel')} must be at least 1")
    if args.parallel > 1 and not args.summary_only:
        run_parallel(rows, args.runs, args.parallel, args.data_root, args.device, args.loader_workers)
    elif not args.summary_only:
        for row in rows:
            print(f"== {row.name}: seeds {row.seeds}")
            run_row(row, args.runs, args.data_root, args.device, workers=args.loader_workers)
    if args.tta:
        for row in rows:
            for seed in (seed for seed in row.seeds if row.finished(args.runs, seed, args.data_root)):
                try:
                    scores = evaluate_tta(row, seed, args.runs, args.data_root, args.device)
                except CasdError as error:  # that seed goes without; the others and the table still come
                    print(f"casd experiment: warning: {error}", file=sys.stderr)
                    continue
                print(f"{row.name} seed {seed}: test OA with TTA {100 * scores['overall_accuracy']:.2f} %")
    print(summary_table(rows, args.runs, args.data_root))
    return 0


def add_experiment_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "experiment", _run_experiment, "run table rows of a study (config files) over their seeds, then summarise",
        "Train every seed of each row file (TOML, see experiments/) into RUNS/<row>/seed<k>/, "
        "resuming interrupted runs and skipping finished ones, then print a Markdown table of "
        "test OA and kappa (mean ± std over seeds), training time and images/s. Each finished seed "
        "leaves a record beside its row file (results/<row>/seed<k>.json: metrics, history, its "
        "labels for the validation rows, TTA score); the table is made from the records, so it "
        "outlives RUNS.")
    p.add_argument("rows", type=Path, nargs="+", help="row files, e.g. experiments/aid20/casd.toml")
    p.add_argument("--runs", type=Path, default=Path("runs/experiments"), help="where the runs live")
    p.add_argument("--data", dest="data_root", type=Path,
                   help="data root the row paths are relative to (default: $CASD_DATA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seeds", type=int, nargs="+", help="run only these seeds instead of the rows' own")
    p.add_argument("--parallel", type=int, default=1,
                   help="train this many seeds at once, each in its own process (e.g. 4 on one GPU)")
    p.add_argument("--loader-workers", type=int,
                   help="data-loading processes per run (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: only print the table of what is finished (with --tta, score that first)")
    p.add_argument("--tta", action="store_true",
                   help="also score each finished seed's test rows with test-time augmentation (8 views: 8x an "
                        "evaluation; once per seed, kept in its record) for a TTA column")
