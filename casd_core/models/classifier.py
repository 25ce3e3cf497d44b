"""The scene classifier: a backbone trunk and one linear head, built from ImageNet weights
or from a model package's trained backbone (fine-tuning).

The trainer uses the embeddings too (class-centroid negative mining), so they are part of the
API. :func:`build_model_from_package` takes a model package's trained backbone (batch norm
statistics included) under a new head, widening an RGB stem for more bands;
:func:`package_normalization` gives the matching per-band mean/std.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from casd_core.errors import CasdError, param
from casd_core.models.backbones import backbone_trunk, check_backbone_name, default_normalization, replace_stem

if TYPE_CHECKING:
    from casd_core.package import ModelPackage


class SceneClassifier(nn.Module):
    """A backbone trunk (image -> pooled embedding) and one linear classification head.

    ``features(x)`` returns the ``(B, embedding_dim)`` embedding; ``forward(x)`` the logits, or
    ``(logits, features)`` with ``return_features=True``.
    """

    def __init__(self, trunk: nn.Module, embedding_dim: int, num_classes: int, *,
                 backbone_name: str, in_channels: int) -> None:
        super().__init__()
        self.backbone = trunk
        self.head = nn.Linear(embedding_dim, num_classes)
        self.backbone_name = backbone_name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        logits = self.head(features)
        if return_features:
            return logits, features
        return logits


def build_model(name: str, num_classes: int, in_channels: int = 3,
                pretrained: str | None = "imagenet") -> SceneClassifier:
    """A :class:`SceneClassifier` on backbone ``name`` for ``in_channels`` bands.

    ``pretrained="imagenet"`` loads ImageNet weights (offline for the EfficientNet-Lite
    backbones, a download for the torchvision ones); ``None`` or ``"none"`` gives a random init and
    never touches the network. The head is always freshly initialised. With ``in_channels``
    other than 3 the first convolution is widened or narrowed by :func:`adapt_stem`.
    """
    check_backbone_name(name)
    if in_channels < 1:
        raise CasdError(f"a model needs at least one input band, got {in_channels}")
    if num_classes < 1:
        raise CasdError(f"a model needs at least one class, got {num_classes}")
    trunk, embedding_dim = backbone_trunk(name, pretrained)
    if in_channels != 3:
        replace_stem(trunk, name, in_channels)
    return SceneClassifier(trunk, embedding_dim, num_classes, backbone_name=name,
                           in_channels=in_channels)


def build_model_from_package(package: "ModelPackage", num_classes: int,
                             in_channels: int | None = None) -> SceneClassifier:
    """A :class:`SceneClassifier` whose backbone is ``package``'s (its trained weights, batch-norm
    statistics included) and whose head is new, for ``num_classes`` classes: fine-tuning.

    ``in_channels`` (default: the package's bands) may differ from the package's only for an
    RGB package: the trained stem is then widened or narrowed by :func:`adapt_stem`, exactly as
    :func:`build_model` does for ImageNet weights (RGB filters kept, NIR and other extra bands
    start from their mean). Normalise the input with :func:`package_normalization`.
    """
    in_channels = package.in_channels if in_channels is None else in_channels
    if in_channels != package.in_channels and package.in_channels != 3:
        raise CasdError(f"the {param('init')} model takes {package.in_channels} bands and these images "
                        f"have {in_channels}; choose {package.in_channels} {param('bands')}, or start "
                        "from an RGB model (its stem is widened to any number of bands)")
    model = build_model(package.backbone, num_classes, in_channels=package.in_channels, pretrained=None)
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in package.state_dict.items() if k.startswith(prefix)}
    try:
        model.backbone.load_state_dict(weights)
    except RuntimeError as exc:
        raise CasdError(f"the weights of the {param('init')} model do not fit a {package.backbone!r} "
                        f"backbone ({str(exc).splitlines()[0]}); is it a package written by `casd train`?") from None
    if in_channels != package.in_channels:
        replace_stem(model.backbone, package.backbone, in_channels)
        model.in_channels = in_channels
    return model


def package_normalization(package: "ModelPackage", in_channels: int) -> tuple[list[float], list[float]]:
    """Per-band ``(mean, std)`` for fine-tuning ``package`` on ``in_channels`` bands: the
    package's own values for its bands, :func:`default_normalization`'s for bands beyond them
    (NIR on an RGB model); with fewer bands than an RGB package every band gets the mean of its
    values (a grey band acts as R = G = B, as :func:`adapt_stem` assumes)."""
    mean, std = list(package.mean), list(package.std)
    if in_channels < len(mean):
        return [round(sum(mean) / len(mean), 6)] * in_channels, [round(sum(std) / len(std), 6)] * in_channels
    extra_mean, extra_std = default_normalization(package.backbone, in_channels)
    return mean + extra_mean[len(mean):], std + extra_std[len(std):]
