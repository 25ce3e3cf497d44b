"""Backbone factory: every backbone for 3 and 4 bands, offline Lite0 weights, stem adaptation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn

from casd_core.errors import CasdError
from casd_core.models import (BACKBONES, SceneClassifier, adapt_stem, build_model, build_model_from_package,
                              default_normalization, lite_weights_path)

REQUIRED = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16",
            "swin_t", "efficientnet_lite0", "efficientnet_lite2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards run fastest on one thread; two OpenMP threads on 2 busy cores spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)


def test_required_backbones_are_listed():
    assert set(REQUIRED) <= set(BACKBONES)


_REUSED: dict[str, SceneClassifier] = {}  # the RGB ViT, slow to build, reused below


def _cases() -> list[tuple[str, int]]:
    # Required backbones with 3 and 4 bands; the extra ones with 4 bands (the stem path).
    return [(name, bands) for name in BACKBONES for bands in (3, 4) if bands == 4 or name in REQUIRED]


@pytest.mark.parametrize(("name", "bands"), _cases())
def test_backbone_builds_and_gives_logits_and_features(name, bands):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=bands, pretrained=None).eval()
    if (name, bands) == ("vit_b_16", 3):
        _REUSED[name] = model
    assert isinstance(model, SceneClassifier)
    assert (model.backbone_name, model.num_classes, model.in_channels) == (name, 5, bands)
    x = torch.randn(2, bands, 32, 32)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        torch.testing.assert_close(model(x), logits)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert features.shape == (2, model.embedding_dim)
    assert model.head.in_features == model.embedding_dim


def test_vit_at_its_training_size_matches_torchvision():
    model = _REUSED.pop("vit_b_16", None)
    if model is None:  # run on its own
        model = build_model("vit_b_16", num_classes=3, pretrained=None).eval()
    trunk = model.backbone
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = trunk.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([trunk.class_token, tokens], dim=1)
        reference = trunk.encoder(tokens)[:, 0]  # torchvision's Encoder adds pos_embedding itself
        torch.testing.assert_close(model.features(x), reference)


def test_lite0_imagenet_weights_come_from_the_offline_file(lite0_state_dict):
    model = build_model("efficientnet_lite0", num_classes=7, in_channels=3, pretrained="imagenet")
    trunk_state = model.backbone.state_dict()
    for key in ("_conv_stem.weight", "_blocks.7._expand_conv.weight", "_bn1.running_var",
                "_conv_head.weight"):
        assert torch.equal(trunk_state[key], lite0_state_dict[key]), key
    assert not any(key.startswith("_fc") for key in trunk_state)  # ImageNet head dropped
    assert model.head.out_features == 7 and model.embedding_dim == 1280


def test_lite0_four_band_stem_keeps_rgb_bit_exact(lite0_state_dict):
    model = build_model("efficientnet_lite0", num_classes=2, in_channels=4, pretrained="imagenet")
    rgb = lite0_state_dict["_conv_stem.weight"]
    stem = model.backbone._conv_stem
    assert isinstance(stem, Conv2dDynamicSamePadding) and stem.in_channels == 4  # still TF-"same" padding
    assert stem.weight.shape == (32, 4, 3, 3)
    assert torch.equal(stem.weight[:, :3], rgb)
    # documented init: the one extra band gets the mean of the RGB filters / (4 - 3)
    assert torch.allclose(stem.weight[:, 3], rgb.mean(dim=1), atol=0, rtol=1e-6)
    # the package reload path: same architecture with pretrained=None takes these weights
    clone = build_model("efficientnet_lite0", num_classes=2, in_channels=4, pretrained=None)
    clone.load_state_dict(model.state_dict())


def test_adapt_stem_rules():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True)
    assert adapt_stem(conv, 3) is conv

    six = adapt_stem(conv, 6)
    assert six.in_channels == 6 and six.weight.shape == (8, 6, 3, 3) and six is not conv
    assert torch.equal(six.weight[:, :3], conv.weight)
    for band in range(3, 6):
        torch.testing.assert_close(six.weight[:, band], conv.weight.mean(dim=1) / 3)
    assert torch.equal(six.bias, conv.bias)
    assert conv.weight.shape == (8, 3, 3, 3)  # the original is untouched

    grey = torch.rand(1, 1, 16, 16)
    one = adapt_stem(conv, 1)
    # a single band acts like the grey image fed as R = G = B
    torch.testing.assert_close(one(grey), conv(grey.expand(-1, 3, -1, -1)))
    two = adapt_stem(conv, 2)
    torch.testing.assert_close(two(grey.expand(-1, 2, -1, -1)), conv(grey.expand(-1, 3, -1, -1)))

    with pytest.raises(ValueError):
        adapt_stem(nn.Conv2d(4, 8, 3), 5)


def test_torchvision_imagenet_weights_without_internet_is_a_clear_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(CasdError) as info:
        build_model("mobilenet_v3_large", num_classes=4, pretrained="imagenet")
    message = str(info.value)
    assert "mobilenet_v3_large" in message and "\n" not in message
    assert info.value.params == ["pretrained", "backbone"]  # each face names the two settings its way


def test_torchvision_imagenet_weights_are_loaded_then_stem_adapted(monkeypatch):
    torch.manual_seed(1)
    imagenet = torchvision.models.mobilenet_v3_large().state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return imagenet

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    model = build_model("mobilenet_v3_large", num_classes=4, in_channels=5, pretrained="imagenet")
    assert urls == [torchvision.models.MobileNet_V3_Large_Weights.DEFAULT.url]
    trunk = model.backbone.state_dict()
    for key in ("features.16.0.weight", "classifier.0.weight"):  # last conv, pretrained penultimate
        assert torch.equal(trunk[key], imagenet[key]), key
    stem = model.backbone.features[0][0]
    assert stem.weight.shape[1] == 5 and torch.equal(stem.weight[:, :3], imagenet["features.0.0.weight"])


def test_random_init_never_downloads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pretrained=None must not download")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", forbidden)
    build_model("mobilenet_v3_large", num_classes=2, pretrained="none")


def test_bad_arguments_are_user_errors():
    with pytest.raises(CasdError, match="resnet18.*efficientnet_lite0|efficientnet_lite0.*resnet18"):
        build_model("alexnet_9000", num_classes=3)
    with pytest.raises(CasdError, match="imagenet"):
        build_model("efficientnet_lite0", num_classes=3, pretrained="coco")
    with pytest.raises(CasdError):
        build_model("efficientnet_lite0", num_classes=3, in_channels=0, pretrained=None)
    with pytest.raises(CasdError):
        default_normalization("alexnet_9000", 3)


def test_default_normalization():
    mean, std = default_normalization("resnet50", 3)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    mean, std = default_normalization("swin_t", 5)
    assert mean == pytest.approx([0.485, 0.456, 0.406, 0.449, 0.449])
    assert std == pytest.approx([0.229, 0.224, 0.225, 0.226, 0.226])
    mean, std = default_normalization("efficientnet_lite0", 4)
    assert mean == pytest.approx([127 / 255] * 4, abs=1e-6) and std == pytest.approx([128 / 255] * 4, abs=1e-6)
    mean, std = default_normalization("resnet18", 1)
    assert mean == pytest.approx([0.449]) and std == pytest.approx([0.226])
    assert all(type(v) is float for v in mean + std)


def test_short_runs_get_exact_batch_norm_statistics_on_their_images(aid_root):
    """EfficientNet-Lite's running statistics move 1 % per step: under 300 steps they still
    describe the package's data, so a short fine-tune re-estimates them on its own images,
    as the average of its batches (real AID images at 64 px, the stem's batch norm)."""
    from casd_core.models import batch_norm_lags, recompute_batch_norm
    from casd_core.package import ModelPackage, default_model_path
    from PIL import Image

    model = build_model("efficientnet_lite0", 3, pretrained="none")
    assert batch_norm_lags(model, 299) and not batch_norm_lags(model, 300)
    assert not batch_norm_lags(model, 20 * 49)  # the shipped recipe: 20 epochs of 49 steps
    model = build_model_from_package(ModelPackage.load(default_model_path()), 3, 3)
    paths = sorted((aid_root / "Pond").glob("*.jpg"))[:12]
    mean, std = torch.tensor(default_normalization("efficientnet_lite0", 3)).view(2, 3, 1, 1)
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((64, 64)))).permute(2, 0, 1)
                          for p in paths]).float() / 255
    images = (images - mean) / std
    stem, bn = model.backbone._conv_stem, model.backbone._bn0
    with torch.no_grad():
        inputs = stem(images)
    assert not torch.allclose(bn.running_mean, inputs.mean((0, 2, 3)), atol=1e-3)  # the package's
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(12)), batch_size=4)
    recompute_batch_norm(model.eval(), loader, torch.device("cpu"))
    batches = inputs.split(4)  # the statistics are the plain average of the batches' statistics
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0),
                               atol=1e-4, rtol=1e-3)
    assert bn.momentum == pytest.approx(0.01) and not model.training  # settings left as they were


@pytest.mark.parametrize("size", [224, 150, 97])
def test_lite_convolutions_pad_inside_with_the_librarys_numbers(size: int, one_torch_thread) -> None:
    """build_model swaps the library's same-padding forward for one that lets symmetric padding
    happen inside the convolution (docs/BENCHMARKS.md); its outputs are the library's, bit for bit."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=5, pretrained="imagenet").eval()
    convs = [m for m in model.modules() if isinstance(m, Conv2dDynamicSamePadding)]
    assert len(convs) == 49 and all(type(m) is not Conv2dDynamicSamePadding for m in convs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        for module in convs:
            module.__class__ = Conv2dDynamicSamePadding
        assert torch.equal(model(x), ours)
