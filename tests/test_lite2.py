"""EfficientNet-Lite2 as a first-class backbone: offline ImageNet weights, package, fine-tune
init, ONNX export at its native 260 px (issue 14)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from casd_core.data import build_transforms, read_image, read_split
from casd_core.errors import CasdError
from casd_core.models import build_model, build_model_from_package, default_normalization, lite_weights_path
from casd_core.package import ModelPackage, default_class_colors
from casd_core.train import TrainConfig, Trainer, train

NATIVE = 260  # efficientnet_lite_pytorch's global params for lite2: (1.1, 1.2, 260, 0.3)
# What a folded export is made of: the TF-"same" padding arithmetic on the input's shape (Shape,
# Gather, Concat, ...) is gone, and its constant pads are inside the Convs (no Pad node).
PLAIN_OPS = {"Conv", "Clip", "Add", "GlobalAveragePool", "Reshape", "Gemm", "Div", "Softmax"}


@pytest.fixture(scope="module")
def lite2_package(aid_root: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> Path:
    """An AID-style Lite2 package at 260 px: the ImageNet trunk (shipped offline), a random head."""
    _, names = read_split(aid_root / "split_20.csv", aid_root)
    torch.manual_seed(0)
    mean, std = default_normalization("efficientnet_lite2", 3)
    package = ModelPackage(backbone="efficientnet_lite2", class_names=names, class_colors=default_class_colors(names),
                           bands=["red", "green", "blue"], input_size=NATIVE, mean=mean, std=std,
                           tile_footprint_m=120.0,
                           state_dict=build_model("efficientnet_lite2", len(names), pretrained="imagenet").state_dict())
    return package.save(tmp_path_factory.mktemp("lite2") / "lite2.safetensors")


def _aid_batch(aid_root: Path, package: ModelPackage, count: int = 2) -> torch.Tensor:
    splits, _ = read_split(aid_root / "split_20.csv", aid_root)
    transform = build_transforms(package.input_size, package.mean, package.std, train=False)
    return torch.stack([transform(read_image(sample.path)) for sample in splits["test"][::2000][:count]])


def test_lite2_imagenet_weights_come_from_the_offline_file(one_torch_thread) -> None:
    weights = torch.load(lite_weights_path("efficientnet_lite2"), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite2", num_classes=30, pretrained="imagenet").eval()
    trunk = model.backbone.state_dict()
    assert set(trunk) == {key for key in weights if not key.startswith("_fc")}  # ImageNet head dropped
    for key in trunk:
        assert torch.equal(trunk[key], weights[key]), key
    assert model.embedding_dim == 1280 and model.head.out_features == 30
    with torch.no_grad():
        logits, features = model(torch.zeros(2, 3, NATIVE, NATIVE), return_features=True)
    assert logits.shape == (2, 30) and features.shape == (2, 1280)
    # the TF reference preprocessing of every EfficientNet-Lite: (x * 255 - 127) / 128
    assert default_normalization("efficientnet_lite2", 3) == default_normalization("efficientnet_lite0", 3)


def test_lite2_package_loads_fine_tunes_and_fits_the_plugin_budget(lite2_package: Path, aid_root: Path) -> None:
    package = ModelPackage.load(lite2_package)
    assert package.backbone == "efficientnet_lite2" and package.input_size == NATIVE
    assert lite2_package.stat().st_size < 20e6  # fp32; the plugin ZIP's limit is 25 MB
    model = package.build_model()
    x = _aid_batch(aid_root, package)
    with torch.no_grad():
        expected = build_model("efficientnet_lite2", 30, pretrained="imagenet").eval().backbone(x)
        torch.testing.assert_close(model.features(x), expected)
        # fine-tuning starts from the package's backbone under a new head
        tuned = build_model_from_package(package, num_classes=4).eval()
        torch.testing.assert_close(tuned.features(x), expected)
    assert tuned.head.out_features == 4


def test_lite2_onnx_export_folds_its_padding_and_matches_torch(lite2_package: Path, aid_root: Path,
                                                               tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    from casd_core.onnx.export import export_onnx

    out = export_onnx(lite2_package, tmp_path / "lite2.onnx")  # checks itself against torch (1e-4)
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert ops <= PLAIN_OPS, ops - PLAIN_OPS
    package = ModelPackage.load(lite2_package)
    x = _aid_batch(aid_root, package)
    with torch.inference_mode():
        expected = torch.softmax(package.build_model()(x) / package.temperature, dim=1).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (2, 30)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_fine_tuning_a_lite2_package_trains_its_backbone_without_naming_it(lite2_package: Path, aid_root: Path,
                                                                           tmp_path: Path) -> None:
    # The train defaults name Lite0; a fine-tune from any other package (a Lite2 default model,
    # the plugin's polygon training, which has no backbone setting) trains the package's own.
    cfg = TrainConfig(data_root=aid_root, split_csv=aid_root / "split_20.csv", out_dir=tmp_path / "run",
                      method="ce", epochs=1, freeze_epochs=1, input_size=64, batch_size=16, subset_per_class=4,
                      val_fraction=0.25, init=str(lite2_package), device="cpu")
    result = train(cfg)
    tuned = ModelPackage.load(result.package_path)
    assert tuned.backbone == tuned.training["backbone"] == "efficientnet_lite2"
    assert tuned.input_size == tuned.training["input_size"] == 64  # as asked for
    assert train(cfg).package_path == result.package_path  # the same fingerprint: finished, not refused
    # left at the default size, it trains at the package's own 260 px
    assert Trainer(replace(cfg, input_size=TrainConfig.input_size, out_dir=tmp_path / "native")).cfg.input_size == NATIVE
    with pytest.raises(CasdError, match="is a 'efficientnet_lite2', not a 'resnet18'") as error:
        train(replace(cfg, backbone="resnet18", out_dir=tmp_path / "other"))
    assert error.value.params == ["init", "backbone"]
