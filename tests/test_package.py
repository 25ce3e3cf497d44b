"""The model package: round trip, and refusal of anything that is not one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from casd_core.errors import CasdError
from casd_core.models import build_model, default_normalization
from casd_core.package import ModelPackage, default_class_colors

NAMES = ["Forest", "River", "Pond", "Farmland"]


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", len(NAMES), in_channels=4, pretrained=None)
    mean, std = default_normalization("efficientnet_lite0", 4)
    return ModelPackage(backbone="efficientnet_lite0", class_names=NAMES, class_colors=default_class_colors(NAMES),
                        bands=["red", "green", "blue", "nir"], input_size=64, mean=mean, std=std,
                        value_scale=10000.0, gsd_m=0.6, tile_footprint_m=90.0,
                        training={"method": "casd", "seed": 1}, metrics={"test": {"overall_accuracy": 0.5}},
                        state_dict=model.state_dict())


def test_round_trip_keeps_description_and_predictions(package: ModelPackage, tmp_path: Path) -> None:
    path = package.save(tmp_path / "m.safetensors")
    loaded = ModelPackage.load(path)
    assert loaded.metadata() == package.metadata()
    x = torch.rand(2, 4, 64, 64)
    with torch.inference_mode():
        assert torch.equal(package.build_model()(x), loaded.build_model()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_half_precision_package_is_half_the_size(package: ModelPackage, tmp_path: Path) -> None:
    full = package.save(tmp_path / "full.safetensors").stat().st_size
    half = package.save(tmp_path / "half.safetensors", half=True).stat().st_size
    assert half < 0.6 * full
    x = torch.rand(1, 4, 64, 64)
    with torch.inference_mode():
        reference = package.build_model()(x)
        loaded = ModelPackage.load(tmp_path / "half.safetensors")
        approx = loaded.build_model()(x)
    assert torch.allclose(reference, approx, atol=0.05)
    # read back as float32, as every consumer (fine-tuning, comparisons) expects
    assert {t.dtype for t in loaded.state_dict.values() if t.is_floating_point()} == {torch.float32}


class _Payload:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = tmp_path / "model.safetensors"
    planted.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    with pytest.raises(CasdError, match="not a CASD model package"):
        ModelPackage.load(planted)
    torch.save({"x": _Payload(marker)}, tmp_path / "torch.safetensors")
    with pytest.raises(CasdError, match="not a CASD model package"):
        ModelPackage.load(tmp_path / "torch.safetensors")
    assert not marker.exists()


def test_foreign_and_tampered_files_are_refused(package: ModelPackage, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CasdError, match="not a CASD model package"):
        ModelPackage.load(foreign)

    meta = package.metadata()
    meta["format"] = "something-else"
    wrong_format = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong_format), metadata={"casd": json.dumps(meta)})
    with pytest.raises(CasdError, match="not a CASD model package"):
        ModelPackage.load(wrong_format)

    meta = package.metadata()
    meta["class_colors"] = meta["class_colors"][:1]
    inconsistent = tmp_path / "inconsistent.safetensors"
    save_file({"w": torch.zeros(2)}, str(inconsistent), metadata={"casd": json.dumps(meta)})
    with pytest.raises(CasdError, match="inconsistent"):
        ModelPackage.load(inconsistent)

    path = package.save(tmp_path / "ok.safetensors")
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32  # clobber the header
    truncated = tmp_path / "clobbered.safetensors"
    truncated.write_bytes(bytes(data))
    with pytest.raises(CasdError, match="not a CASD model package"):
        ModelPackage.load(truncated)

    with pytest.raises(CasdError, match="does not exist"):
        ModelPackage.load(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_architecture_are_refused(package: ModelPackage, tmp_path: Path) -> None:
    meta = {k: v for k, v in package.metadata().items() if k not in ("format", "format_version")}
    wrong = ModelPackage(**{**meta, "class_names": NAMES[:3], "class_colors": default_class_colors(NAMES[:3])},
                         state_dict=package.state_dict)
    with pytest.raises(CasdError, match="do not fit"):
        ModelPackage.load(wrong.save(tmp_path / "wrong.safetensors")).build_model()
