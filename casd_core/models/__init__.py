"""Backbone factory: any supported backbone as a scene classifier, for any number of bands.

One job per module::

    backbones.py   the backbones as trunks (image -> pooled embedding), their ImageNet weights and
                   normalisation, the stem widened to any number of bands (adapt_stem)
    classifier.py  trunk + linear head (SceneClassifier), from ImageNet weights or a package's
    batch_norm.py  whether running statistics lag a short run's weights, and re-estimating them

The public names are re-exported here: ``from casd_core.models import build_model``.
"""

from casd_core.models.backbones import (BACKBONES, PRETRAINED_CHOICES, adapt_stem, default_normalization,
                                        lite_weights_path)
from casd_core.models.batch_norm import BATCH_NORM_SETTLE_MOMENTA, batch_norm_lags, recompute_batch_norm
from casd_core.models.classifier import (SceneClassifier, build_model, build_model_from_package,
                                         package_normalization)

__all__ = [
    "BACKBONES", "BATCH_NORM_SETTLE_MOMENTA", "PRETRAINED_CHOICES", "SceneClassifier", "adapt_stem",
    "batch_norm_lags", "build_model", "build_model_from_package", "default_normalization", "lite_weights_path",
    "package_normalization", "recompute_batch_norm",
]
