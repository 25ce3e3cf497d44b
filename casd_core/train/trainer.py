"""One training loop for plain CE, CS-KD and CASD, with resume and best-on-validation.

Every epoch ends with an atomic checkpoint (model, loss incl. α, optimiser, schedule, sampler,
RNG states), so a run that is killed, even with ``kill -9`` mid-epoch, continues from the last
finished epoch when the same command is run again. The validation split is carved from the
``train`` rows; the ``test`` rows are evaluated once, with the best-on-validation weights and
the softmax temperature fitted on the validation rows (:mod:`casd_core.calibration`).
With ``init`` the run fine-tunes a model package's backbone under a new head, optionally
frozen for the first ``freeze_epochs`` (:mod:`casd_core.finetune`).

Under ``torchrun`` (:mod:`casd_core.distributed`) the same run is data-parallel: each of the
W ranks trains ``batch_size`` anchors per step with DistributedDataParallel, so the global
batch is W × ``batch_size`` and the ranks' batches together are the one-process batch of that
size (:class:`~casd_core.sampling.TripletSampler`). Batch norm stays per rank (no SyncBatchNorm):
a rank normalises over 1-3 × ``batch_size`` images, enough for stable statistics, and a
synchronised layer would add one all-reduce per BN layer per step (~50 in EfficientNet-Lite0),
which costs more than it gives on gloo and across nodes; DDP broadcasts rank 0's running
statistics each step, so all ranks and the package hold the same ones. α's gradient and the
confusion/centroid statistics are reduced over the ranks. Rank 0 alone validates (the same
evaluation as one process, so deterministic) and writes the checkpoint, metrics log, package
and result, atomically; a rerun after a kill of any rank resumes on every rank from that
checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from casd_core import distributed
from casd_core.atomic import atomic_path, write_text_atomic
from casd_core.calibration import fit_on_validation
from casd_core.data import RunData, pixel_statistics
from casd_core.errors import CasdError, param
from casd_core.evaluate import evaluate_model, write_report
from casd_core.finetune import (finetune_config, keep_batch_norm_statistics, resolve_init, set_backbone_frozen,
                                training_scale)
from casd_core.losses import build_loss
from casd_core.models import (batch_norm_lags, build_model, build_model_from_package, default_normalization,
                              package_normalization, recompute_batch_norm)
from casd_core.package import ModelPackage
from casd_core.progress import Monitor
from casd_core.runtime import prefers_channels_last, prepare_cpu
from casd_core.sampling import (TripletDataset, TripletSampler, class_similarity_from_centroids,
                                class_similarity_from_confusion)
from casd_core.style import CLASSES_FILE, training_class_colors
from casd_core.train.config import TrainConfig
from casd_core.train.step import BRANCHES, autocast_dtype, training_step

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_LOG_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"  # written last: its presence marks a finished run (of its fingerprint's settings)


@dataclass
class TrainResult:
    package_path: Path
    metrics: dict[str, Any]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Runs a :class:`TrainConfig` to a model package, resuming from its checkpoint; one rank
    of a distributed run when ``where`` is (see the module's docstring)."""

    def __init__(self, cfg: TrainConfig, monitor: Monitor | None = None,
                 where: distributed.Rank | None = None) -> None:
        self.cfg = cfg
        self.monitor = monitor or Monitor()
        self.where = where or distributed.Rank(0, 1, 0, distributed.rank_device(cfg.device))
        self.main = self.where.is_main
        self.device = self.where.device
        prepare_cpu()  # ~1.8x faster CASD steps on CPU (benchmarks/bench_training.py)
        self.init = resolve_init(cfg.init)  # fine-tuning: the package whose backbone we start from
        cfg = self.cfg = finetune_config(cfg, self.init)  # recorded and fingerprinted as trained
        self.data = RunData(cfg, lambda bands: (package_normalization(self.init.package, bands) if self.init
                                                else default_normalization(cfg.backbone, bands)))
        self.scale = training_scale(cfg.tile_footprint_m, cfg.gsd_m, cfg.input_size, cfg.data_root, cfg.split_csv,
                                    [s.path for s in self.data.train.samples], self.init)
        num_classes = len(self.data.class_names)
        _seed_everything(cfg.seed)
        if self.init:  # a resumed run overwrites these weights with its checkpoint's
            self._say(f"fine-tuning the {self.init.package.backbone} backbone of {self.init.path} on "
                       f"{num_classes} classes; tiles of {self.scale['tile_footprint_m']} m ({self.scale['source']})")
            model = build_model_from_package(self.init.package, num_classes, len(self.data.bands))
        else:
            model = build_model(cfg.backbone, num_classes, len(self.data.bands), pretrained=cfg.pretrained)
        self.model = model.to(self.device)
        self.loss = build_loss(cfg.loss, num_classes).to(self.device)
        self.cuda = self.device.type == "cuda"
        if prefers_channels_last(self.device):
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        params = [{"params": self.model.parameters()},
                  {"params": [p for p in self.loss.parameters() if p.requires_grad], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        world = self.where.world_size
        if len(self.data.train) < world:
            raise CasdError(f"the training split has {len(self.data.train)} images, fewer than the {world} "
                            "processes of this run; start fewer processes")
        self.sampler = TripletSampler(self.data.train.labels, num_classes,
                                      strategy=cfg.negatives if self.loss.needs_negative else "random",
                                      seed=cfg.seed, num_replicas=world, rank=self.where.rank,
                                      global_batch=cfg.batch_size * world if world > 1 else None)
        triplets = TripletDataset(self.data.train, with_positive=self.loss.needs_positive,
                                  with_negative=self.loss.needs_negative)
        cores = max(1, (os.cpu_count() or 1) // distributed.processes_per_node())  # a node's ranks share its cores
        self.workers = workers = cfg.workers if cfg.workers is not None else (min(8, cores) if self.cuda else 1)
        # Several ranks: the sampler already cut the epoch into whole global batches.
        self.train_loader = DataLoader(triplets, batch_size=cfg.batch_size, sampler=self.sampler,
                                       num_workers=workers, persistent_workers=workers > 0, pin_memory=self.cuda,
                                       drop_last=world == 1 and len(triplets) > cfg.batch_size)
        # What runs the forward pass: the model itself, or its DDP wrapper (same parameters).
        # Frozen epochs leave the backbone without gradients, which DDP must be told to expect.
        self.net: torch.nn.Module = self.model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.cuda else None,
            find_unused_parameters=cfg.freeze_epochs > 0)
        self.steps_per_epoch = len(self.train_loader)
        # A short run from ImageNet weights leaves batch-norm statistics behind its weights (a
        # fine-tune keeps the package's statistics instead: keep_batch_norm_statistics).
        self.recompute_bn = not self.init and batch_norm_lags(
            self.model, self.steps_per_epoch * max(0, cfg.epochs - cfg.freeze_epochs))
        total = self.steps_per_epoch * cfg.epochs
        warmup = max(1, int(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _warmup_cosine(step, warmup, total))
        self.scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(cfg.precision, self.device) == torch.float16)
        self.start_epoch = 0
        self.best_val = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = cfg.out_dir / CHECKPOINT_NAME

    # -- checkpointing ------------------------------------------------------------------------

    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        return {
            "fingerprint": self.cfg.fingerprint(),
            "init_sha256": self.init.sha256 if self.init else "",
            "epoch": epoch,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "best_val": self.best_val,
            "best_state": self.best_state,
            "history_json": json.dumps(self.history),
            "rng_torch": torch.get_rng_state(),
            "world_size": self.where.world_size,
        }

    def resume(self) -> None:
        """Continue from the checkpoint in ``out_dir`` when there is one for this config.

        Rank 0 reads and checks it and hands it (or the reason it cannot be resumed) to every
        rank, so all ranks continue from the same epoch even when only rank 0 can see
        ``out_dir`` (another node without a shared disk)."""
        state, problem = None, None
        if self.main:
            try:
                state = self._read_checkpoint()
            except CasdError as exc:
                problem = exc.template
        if self.where.world_size > 1:
            state, problem = distributed.broadcast_object((state, problem))
        if problem is not None:
            raise CasdError(problem)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.best_val, self.best_state = state["best_val"], state["best_state"]
        self.history = json.loads(state["history_json"])
        torch.set_rng_state(state["rng_torch"].cpu())
        self.start_epoch = state["epoch"] + 1
        self._say(f"{self.cfg.out_dir}: resuming after epoch {self.start_epoch}/{self.cfg.epochs}")

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint in ``out_dir`` if it belongs to this run (``None`` when there is none)."""
        if not self.checkpoint_path.is_file():
            return None
        # On the CPU when other ranks receive it: each moves it onto its own device on loading.
        where = self.device if self.where.world_size == 1 else torch.device("cpu")
        try:
            state = torch.load(self.checkpoint_path, map_location=where, weights_only=True)
        except Exception as exc:  # a foreign or damaged file: never unpickle it unrestricted
            raise CasdError(f"cannot read {self.checkpoint_path} ({exc}); delete it to start over") from None
        if state["fingerprint"] != self.cfg.fingerprint():
            raise CasdError(f"{self.cfg.out_dir} holds a run with different settings; "
                            f"use another {param('out_dir')}, or delete its checkpoint.pt to start over")
        if state["epoch"] + 1 < self.cfg.epochs and state.get("world_size", 1) != self.where.world_size:
            # The rest of the run's global batch and schedule depend on it; a finished run does not.
            raise CasdError(f"{self.cfg.out_dir} holds a run trained by {state.get('world_size', 1)} process(es), "
                            f"this one has {self.where.world_size}; resume it with as many (torchrun --nnodes × "
                            "--nproc-per-node), or delete its checkpoint.pt to start over")
        if self.init and state.get("init_sha256") != self.init.sha256:
            raise CasdError(f"the {param('init')} model {self.init.path} changed since the run in "
                            f"{self.cfg.out_dir} started from it; pass the file it started from, or delete its "
                            "checkpoint.pt to start over")
        return state

    # -- one epoch ----------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        frozen = epoch < self.cfg.freeze_epochs  # decided by the epoch, so a resumed run agrees
        if self.cfg.freeze_epochs:
            set_backbone_frozen(self.model, frozen)
        if self.init:
            keep_batch_norm_statistics(self.model)
        self.sampler.set_epoch(epoch)
        num_classes = len(self.data.class_names)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        feature_sums: torch.Tensor | None = None
        class_counts = torch.zeros(num_classes, dtype=torch.float64)
        sums: dict[str, float] = {}
        seen = images_seen = 0
        started = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=None if self.main else True, unit="batch")
        total_steps = self.steps_per_epoch * self.cfg.epochs
        for step, batch in enumerate(bar):
            self.monitor.check_cancelled()
            # From the step count, not a counter: a resumed run continues the same schedule.
            progress = (epoch * self.steps_per_epoch + step) / total_steps
            out, anchor_logits, anchor_features = training_step(
                self.net, self.loss, self.optimizer, self.scaler, batch, self.device, progress, self.cfg.precision)
            self.scheduler.step()

            anchors = batch["anchor_label"]
            np.add.at(confusion, (anchors.numpy(), anchor_logits.argmax(1).cpu().numpy()), 1)
            anchor_features = anchor_features.float().cpu()
            if feature_sums is None:
                feature_sums = torch.zeros(num_classes, anchor_features.shape[1], dtype=torch.float64)
            feature_sums.index_add_(0, anchors, anchor_features.double())
            class_counts += torch.bincount(anchors, minlength=num_classes)
            for name, value in out.terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(anchors)
            seen += len(anchors)
            images_seen += sum(len(batch[k]) for k in BRANCHES if k in batch)
            bar.set_postfix(loss=f"{out.terms.get('total', out.total.item()):.3f}")
            self.monitor.report("steps", step + 1, self.steps_per_epoch,
                                item=f"epoch {epoch + 1}/{self.cfg.epochs}",
                                fraction=(epoch + (step + 1) / self.steps_per_epoch) / self.cfg.epochs)
        bar.close()
        anchors_per_rank = distributed.all_gather_object(seen)
        if distributed.is_distributed():  # every rank then mines the same negatives and logs the whole epoch
            confusion = distributed.all_reduce(torch.from_numpy(confusion)).numpy()
            feature_sums = distributed.all_reduce(feature_sums)
            class_counts = distributed.all_reduce(class_counts)
            names = sorted(sums)
            totals = distributed.all_reduce(torch.tensor([sums[k] for k in names] + [seen, images_seen],
                                                         dtype=torch.float64)).tolist()
            sums, seen, images_seen = dict(zip(names, totals)), int(totals[-2]), int(totals[-1])

        # Hard negatives for the next epoch come from what the model confuses now.
        if self.cfg.negatives == "confusion":
            self.sampler.set_class_similarity(class_similarity_from_confusion(confusion))
        elif self.cfg.negatives == "centroid" and feature_sums is not None:
            centroids = (feature_sums / class_counts.clamp(min=1).unsqueeze(1)).float()
            self.sampler.set_class_similarity(
                class_similarity_from_centroids(centroids, torch.arange(num_classes), num_classes))
        elapsed = time.perf_counter() - started
        metrics = {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
        metrics["train_accuracy"] = float(np.trace(confusion) / max(confusion.sum(), 1))
        metrics["images_per_s"] = images_seen / elapsed
        metrics["epoch_seconds"] = elapsed
        metrics["world_size"] = self.where.world_size
        metrics["anchors_per_rank"] = anchors_per_rank
        if self.cfg.freeze_epochs:
            metrics["backbone_frozen"] = frozen
        return metrics

    # -- the whole run ------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        self.resume()
        package_path = self.cfg.out_dir / self.cfg.package_name
        # Rank 0's disk holds the outputs; the others learn from it whether the run is done.
        trained = distributed.broadcast_object(self.start_epoch >= self.cfg.epochs and package_path.is_file())
        if trained:
            self._say(f"{package_path} is already trained; nothing to do")
            package = ModelPackage.load(package_path) if self.main else None
            metrics = distributed.broadcast_object(package.metrics if self.main else None)
            if self.main:
                self._recolor(package, package_path)
                self._write_result(metrics)  # runs finished before result.json existed get one too
            return TrainResult(package_path, metrics)
        log_path = self.cfg.out_dir / METRICS_LOG_NAME
        for epoch in range(self.start_epoch, self.cfg.epochs):
            metrics = self.train_epoch(epoch)
            if not self.main:  # the other ranks go on to the next epoch and wait there for rank 0
                continue
            if self.recompute_bn and epoch >= self.cfg.freeze_epochs:  # batch norm trained this epoch
                images = DataLoader(self.data.train_unaugmented, batch_size=self.cfg.batch_size * 2,
                                    num_workers=self.workers)
                recompute_batch_norm(self.model, images, self.device)
                metrics["batch_norm_recomputed"] = True
            val = evaluate_model(self.model, self.data.val, self.device, batch_size=self.cfg.batch_size * 2,
                                 workers=self.workers)
            metrics.update(epoch=epoch + 1, lr=self.scheduler.get_last_lr()[0],
                           val_accuracy=val["overall_accuracy"], val_kappa=val["kappa"])
            # Without validation rows there is nothing to select on: the last epoch is the model.
            if len(self.data.val) and val["overall_accuracy"] > self.best_val:
                self.best_val = val["overall_accuracy"]
                self.best_state = copy.deepcopy(self.model.state_dict())
            metrics["best_val_accuracy"] = self.best_val
            self.history.append(metrics)
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(self._checkpoint(epoch), tmp)
            write_text_atomic("".join(json.dumps(m) + "\n" for m in self.history), log_path)
            weight = f"  lambda {metrics['train_distill_weight']:.3f}" if "train_distill_weight" in metrics else ""
            self._say(f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {metrics.get('train_total', float('nan')):.4f}"
                       f"{weight}  val OA {val['overall_accuracy']:.4f}  ({metrics['images_per_s']:.1f} img/s)")
        # Rank 0 finishes alone; the others wait for its result, so every rank returns it.
        return distributed.broadcast_object(self._finish() if self.main else None)

    def _say(self, message: str) -> None:
        """A line for the user, from rank 0 only (the others would repeat it)."""
        if self.main:
            tqdm.write(message)

    def _class_colors(self) -> list[str]:
        init = self.init.package if self.init else None
        inherited = dict(zip(init.class_names, init.class_colors)) if init else None
        return training_class_colors(self.data.class_names, self.cfg.split_csv, self.cfg.data_root, self.monitor.warn,
                                     inherited)

    def _recolor(self, package: ModelPackage, package_path: Path) -> None:
        """A finished run asked again takes the chips' current class colours (the analyst
        restyled the labels): colours are not a training setting, so nothing retrains."""
        colors = self._class_colors()
        if package.class_names != self.data.class_names or colors == package.class_colors:
            return
        package.class_colors = colors
        try:
            package.save(package_path)
        except OSError as error:
            self.monitor.warn(f"{package_path} keeps its old class colours: it could not be rewritten ({error})")
            return
        self._say(f"{package_path}: class colours updated from {CLASSES_FILE} (an .onnx export of it keeps "
                  "the old ones until exported again)")

    def _finish(self) -> TrainResult:
        """Best-on-validation weights → test evaluation (once) → package + report files."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.float().to(memory_format=torch.contiguous_format)
        if not self.history:
            best_epoch = None
        elif len(self.data.val):
            best_epoch = max(self.history, key=lambda m: m["val_accuracy"])["epoch"]
        else:
            best_epoch = self.history[-1]["epoch"]
        best_val = self.best_val if len(self.data.val) else None
        metrics: dict[str, Any] = {"validation": {"overall_accuracy": best_val, "best_epoch": best_epoch,
                                                  "num_samples": len(self.data.val)}}
        # Temperature scaling on the validation rows (never the test rows): calibrated scores.
        temperature, calibration = fit_on_validation(self.model, self.data.val, self.device,
                                                     batch_size=self.cfg.batch_size * 2, workers=self.workers)
        metrics["validation"].update(calibration)
        if len(self.data.test):
            self.monitor.report("images", 0, len(self.data.test), item="test split", fraction=1.0)
            report = evaluate_model(self.model, self.data.test, self.device, batch_size=self.cfg.batch_size * 2,
                                    with_confusion=True, workers=self.workers, temperature=temperature)
            write_report(report, self.data.class_names, self.cfg.out_dir)
            metrics["test"] = {k: report[k] for k in ("overall_accuracy", "kappa", "macro_f1", "ece",
                                                      "ece_uncalibrated", "num_samples")}
        package = ModelPackage(
            backbone=self.cfg.backbone,
            class_names=self.data.class_names,
            class_colors=self._class_colors(),
            bands=self.data.bands,
            input_size=self.cfg.input_size,
            mean=self.data.mean, std=self.data.std, value_scale=self.data.value_scale,
            gsd_m=self.scale["gsd_m"], tile_footprint_m=self.scale["tile_footprint_m"], temperature=temperature,
            pixel_stats=pixel_statistics(self.data.train, seed=self.cfg.seed),
            training={**self.cfg.to_json(), "history": self.history, "scale": self.scale,
                      **({"init_package": self.init.record()} if self.init else {})},
            metrics=metrics,
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        )
        path = package.save(self.cfg.out_dir / self.cfg.package_name)
        self._write_result(metrics)
        return TrainResult(path, metrics)

    def _write_result(self, metrics: dict[str, Any]) -> None:
        result = {"seed": self.cfg.seed, "fingerprint": self.cfg.fingerprint(), "metrics": metrics}
        write_text_atomic(json.dumps(result, indent=2), self.cfg.out_dir / RESULT_NAME)


def train(cfg: TrainConfig, monitor: Monitor | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns the model package written.
    Under ``torchrun`` this process is one rank of a distributed run."""
    with distributed.process_group(cfg.device) as where:
        return Trainer(cfg, monitor, where).fit()
