"""Training: plain CE, CS-KD and CASD in one loop, resumable, data-parallel under torchrun.

One job per module::

    config.py   what defines a run, and the fingerprint its checkpoint is resumed by (TrainConfig)
    step.py     one optimisation step on a triplet batch, in the run's precision (training_step)
    trainer.py  the run: epochs, checkpoint and resume, validation, test, package (Trainer, train)

The public names are re-exported here: ``from casd_core.train import TrainConfig, train``.
"""

from casd_core.train.config import NEGATIVE_STRATEGIES, PRECISIONS, TrainConfig
from casd_core.train.step import BRANCHES, autocast_dtype, training_step
from casd_core.train.trainer import CHECKPOINT_NAME, METRICS_LOG_NAME, RESULT_NAME, Trainer, TrainResult, train

__all__ = [
    "BRANCHES", "CHECKPOINT_NAME", "METRICS_LOG_NAME", "NEGATIVE_STRATEGIES", "PRECISIONS", "RESULT_NAME",
    "TrainConfig", "TrainResult", "Trainer", "autocast_dtype", "train", "training_step",
]
