"""What defines a training run (:class:`TrainConfig`), and the fingerprint a checkpoint is
resumed by."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from casd_core.errors import CasdError, param
from casd_core.losses import AFTER_STUDY, LossConfig

NEGATIVE_STRATEGIES = ("random", "confusion", "centroid")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in the checkpoint and the package.

    The defaults (with :class:`~casd_core.losses.LossConfig`'s) are the recipe of the shipped
    model, ``experiments/aid20_224/casd.toml``: CASD, EfficientNet-Lite0, 224 px, 20 epochs;
    ``tests/test_defaults.py`` checks them against the package's recorded training config.
    Data-specific settings (paths, bands, GSD, tile footprint) have no recipe default.

    ``init`` (a model package, or ``"default"``: the embedded model) starts from that
    package's backbone with a new head, instead of ``pretrained`` weights (the run trains that
    package's backbone whatever ``backbone`` says, unless it names another on purpose, which
    is refused; and at the package's ``input_size`` while this one is at its default:
    :func:`~casd_core.finetune.finetune_config`); ``freeze_epochs``
    keeps the backbone frozen for the first epochs. ``precision`` is the forward passes'
    arithmetic while training (:func:`~casd_core.train.step.autocast_dtype`); validation, the test split and the
    package are float32 whatever it is. ``val_seed`` draws the data rows (the
    validation carve, and the ``subset_per_class`` subsets) with its own seed, so that every
    run of a study, whatever its ``seed``, validates on the very same images; ``None`` draws
    them with ``seed`` (the study's carve differed per seed). The sampler, augmentation and
    weights always follow ``seed``. Settings added after the study carry
    ``metadata=AFTER_STUDY`` (see :meth:`fingerprint`).
    """

    data_root: Path
    split_csv: Path | None
    out_dir: Path
    method: str = "casd"
    backbone: str = "efficientnet_lite0"
    pretrained: str | None = "imagenet"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    input_size: int = 224
    val_fraction: float = 0.1
    seed: int = 0
    negatives: str = "centroid"
    loss: LossConfig = field(default_factory=LossConfig)
    subset_per_class: int | None = None
    package_name: str = "model.safetensors"
    device: str = "auto"
    workers: int | None = None
    bands: tuple[int, ...] | None = None
    value_scale: float | None = None
    gsd_m: float | None = None
    tile_footprint_m: float | None = None
    init: str | None = field(default=None, metadata=AFTER_STUDY)
    freeze_epochs: int = field(default=0, metadata=AFTER_STUDY)
    val_seed: int | None = field(default=None, metadata=AFTER_STUDY)
    precision: str = field(default="auto", metadata=AFTER_STUDY)

    def __post_init__(self) -> None:
        self.data_root, self.out_dir = Path(self.data_root), Path(self.out_dir)
        self.split_csv = Path(self.split_csv) if self.split_csv else None
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.loss.method = self.method
        if self.negatives not in NEGATIVE_STRATEGIES:
            raise CasdError(f"unknown {param('negatives')} strategy {self.negatives!r}; use one of "
                            f"{', '.join(NEGATIVE_STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise CasdError(f"unknown {param('precision')} {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise CasdError(f"{param(key)} must be at least 1, got {getattr(self, key)}")
        if self.freeze_epochs < 0:
            raise CasdError(f"{param('freeze_epochs')} must be 0 or more, got {self.freeze_epochs}")
        self.init = str(self.init) if self.init else None
        if not 0 <= self.val_fraction < 1:
            raise CasdError(f"{param('val_fraction')} must be in [0, 1), got {self.val_fraction}")
        if self.val_seed is not None and self.val_seed < 0:
            raise CasdError(f"{param('val_seed')} must be 0 or more, got {self.val_seed}")

    @property
    def data_seed(self) -> int:
        """The seed the data rows are drawn with: ``val_seed``, or ``seed`` when it is ``None``."""
        return self.seed if self.val_seed is None else self.val_seed

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed: every setting but ``device``,
        ``workers`` and ``out_dir``, and but a setting added after the study (field metadata
        :data:`AFTER_STUDY`, here or in the :class:`~casd_core.losses.LossConfig`) while it is
        at its default, so that adding a setting never changes the fingerprint of the runs
        configured before it existed."""
        omitted = {"device", "workers", "out_dir"} | _after_study_at_default(self)
        settings = {k: v for k, v in self.to_json().items() if k not in omitted}
        omitted_loss = _after_study_at_default(self.loss)
        settings["loss"] = {k: v for k, v in settings["loss"].items() if k not in omitted_loss}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _after_study_at_default(config: Any) -> set[str]:
    """The names of ``config``'s settings added after the study that are at their default."""
    return {f.name for f in fields(config) if f.metadata.get("after_study") and getattr(config, f.name) == f.default}
