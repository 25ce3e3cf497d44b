"""ONNX exports: self-describing files, the onnxruntime predictor agreeing with torch on real
rasters, int8 calibrated on training rows, and tampered files refused before onnxruntime sees
them (custom-op domains, external data outside the model's folder)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from rasterio.windows import Window

from casd_core.cli import main
from casd_core.errors import CasdError
from casd_core.inference import InferenceConfig, Predictor, iter_tile_predictions
from casd_core.inference.onnx_backend import OrtPredictor
from casd_core.onnx.quantize import CalibrationConfig, calibration_batches
from casd_core.package import ModelPackage
from casd_core.tiling import TilingConfig
from helpers import NAIP, build_test_package, derive_raster, plugin_script, run_qgis_script, small_split


# max |p_onnx - p_torch| for an fp32 export (measured ~2e-6 on these rasters)
PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def package_path(tmp_path_factory) -> Path:
    """The test package with a temperature, so calibration is part of what must agree."""
    folder = tmp_path_factory.mktemp("onnx")
    path = build_test_package(folder / "test.safetensors")
    package = dataclasses.replace(ModelPackage.load(path), temperature=0.5,
                                  metrics={"test": {"overall_accuracy": 0.5}})
    return package.save(path)


@pytest.fixture(scope="module")
def onnx_path(package_path: Path) -> Path:
    out = package_path.with_suffix(".onnx")
    assert main(["export", str(package_path), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def gsd_paths(package_path: Path) -> tuple[Path, Path]:
    """A package that knows its GSD: inference feeds it footprint / GSD pixels, so its graph
    takes any tile size."""
    path = dataclasses.replace(ModelPackage.load(package_path), gsd_m=0.5).save(
        package_path.with_name("gsd.safetensors"))
    assert main(["export", str(path), "-o", str(path.with_suffix(".onnx"))]) == 0
    return path, path.with_suffix(".onnx")


def test_export_is_self_describing(package_path: Path, onnx_path: Path) -> None:
    package = ModelPackage.load(package_path)
    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["casd"]) == package.metadata()  # every field of the package
    assert json.loads(props["casd_graph"])["precision"] == "fp32"
    # Deepness's keys, in the formats its model loader parses
    assert json.loads(props["class_names"]) == {str(i): n for i, n in enumerate(package.class_names)}
    assert json.loads(props["tiles_size"]) == json.loads(props["tile_size"]) == 64
    assert json.loads(props["resolution"]) == pytest.approx(120.0 / 64 * 100)  # cm per input pixel
    assert json.loads(props["standardization_mean"]) == pytest.approx(package.mean)
    assert json.loads(props["standardization_std"]) == pytest.approx(package.std)
    assert json.loads(props["model_type"]) == "Classifier"
    (tensor,) = model.graph.input
    assert tensor.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert [d.dim_value for d in tensor.type.tensor_type.shape.dim[1:]] == [3, 64, 64]
    # Each TF "same" padding went into its Conv (a separate Pad cost half the run time,
    # docs/BENCHMARKS.md); the strided ones pad more at the end than at the start.
    assert "Pad" not in {node.op_type for node in model.graph.node}
    conv_pads = [list(a.ints) for node in model.graph.node if node.op_type == "Conv"
                 for a in node.attribute if a.name == "pads"]
    assert any(pads[:2] != pads[2:] for pads in conv_pads)
    loaded = ModelPackage.load(onnx_path)  # the loader dispatches on the file
    assert loaded.metadata() == package.metadata() and loaded.state_dict == {}
    with pytest.raises(CasdError, match="no PyTorch weights"):
        loaded.build_model()


@pytest.mark.parametrize("raster, tiling, tta, gsd", [
    ("test_tiled.tif", TilingConfig(tile_size=60, unit="m"), False, False),
    (NAIP, TilingConfig(tile_size=64, unit="px"), False, False),
    (NAIP, TilingConfig(tile_size=64, unit="px", overlap=0.5), True, False),
    ("test_tiled.tif", TilingConfig(tile_size=32, unit="m"), False, True),  # 64 px at its 0.5 m GSD
], ids=["test_tiled", "naip", "naip-tta", "test_tiled-gsd"])
def test_onnx_predictions_equal_torch(raster, tiling, tta, gsd, rasters, package_path, onnx_path, gsd_paths,
                                      tmp_path) -> None:
    if gsd:
        package_path, onnx_path = gsd_paths
    source = rasters / raster
    if raster == NAIP:  # a real 4-band NAIP subset (the model takes its first three bands)
        source = derive_raster(source, tmp_path / "naip.tif", window=Window(100, 100, 384, 320))
    inference = InferenceConfig(device="cpu", tta=tta)
    torch_path = list(iter_tile_predictions(source, Predictor.from_package(package_path, "cpu"), tiling, inference))
    predictor = Predictor.from_package(onnx_path, "cpu")
    assert isinstance(predictor, OrtPredictor)
    onnx_path_ = list(iter_tile_predictions(source, predictor, tiling, inference))
    assert len(onnx_path_) == len(torch_path) > 8
    for a, b in zip(torch_path, onnx_path_):
        assert (a.row, a.col, a.class_name, a.top2_class) == (b.row, b.col, b.class_name, b.top2_class)
        for field in ("top1_prob", "top2_prob", "top3_prob", "margin"):
            assert abs(getattr(a, field) - getattr(b, field)) < PROBABILITY_TOLERANCE, field


def test_onnx_model_refuses_tiles_of_another_size(rasters, gsd_paths) -> None:
    """A GSD-aware package is fed footprint / GSD pixels: 45 m → 90 px, not the graph's 64."""
    predictor = Predictor.from_package(gsd_paths[1], "cpu")
    stream = iter_tile_predictions(rasters / "test_tiled.tif", predictor, TilingConfig(tile_size=45, unit="m"))
    with pytest.raises(CasdError, match="takes 64-px tiles.*32 m"):
        list(stream)


def test_cli_predicts_with_an_onnx_model(rasters, onnx_path, tmp_path) -> None:
    out = tmp_path / "onnx.gpkg"
    assert main(["predict", str(rasters / "test_tiled.tif"), "-o", str(out), "-m", str(onnx_path),
                 "--tile-size", "60", "--unit", "m", "--quiet"]) == 0
    assert out.is_file()


def test_int8_export_is_calibrated_on_train_rows_only(aid_root, package_path, tmp_path, capsys) -> None:
    split = small_split(aid_root, tmp_path, train_per_class=2, test_per_class=1)
    config = CalibrationConfig(split, aid_root, calibration_per_class=1)
    batches = calibration_batches(ModelPackage.load(package_path), config)
    assert sum(len(b) for b in batches) == 30  # one train row of each class, no test row
    out = tmp_path / "int8.onnx"
    assert main(["export", str(package_path), "-o", str(out), "--int8", "--calibration", str(split),
                 "--data-root", str(aid_root), "--calibration-per-class", "1"]) == 0
    model = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert out.stat().st_size < 0.4 * (package_path.with_suffix(".onnx").stat().st_size or 1)
    predictor = Predictor.from_package(out, "cpu")
    probabilities = predictor.predict_raw(np.full((2, 3, 64, 64), 128, np.uint8))
    assert probabilities.shape == (2, 30) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    # without calibration images an int8 export is refused, naming the flag
    assert main(["export", str(package_path), "-o", str(tmp_path / "x.onnx"), "--int8"]) == 2
    assert "--calibration" in capsys.readouterr().err


# --- tampered files ---------------------------------------------------------------------------

def _tampered(onnx_path: Path, out: Path, change) -> Path:
    model = onnx.load(str(onnx_path))
    change(model)
    onnx.save(model, str(out))
    return out


def _custom_op(model) -> None:
    node = model.graph.node[-1]
    node.domain = "evil.ops"  # a native kernel the runtime would have to load
    model.opset_import.append(onnx.helper.make_opsetid("evil.ops", 1))


def _contrib_opset(model) -> None:
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _external(location: str):
    def change(model) -> None:
        tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
    return change


@pytest.mark.parametrize("change, message", [
    (_custom_op, "custom domain"),
    (_contrib_opset, "custom domain"),
    (_external("/etc/passwd"), "outside the model's folder"),
    (_external("../../secret.bin"), "outside the model's folder"),
    (_external("link/weights.bin"), "outside the model's folder"),  # a symlink out of the folder
], ids=["custom-op", "contrib-opset", "absolute-path", "dot-dot", "symlink"])
def test_tampered_onnx_is_refused(change, message, onnx_path, tmp_path) -> None:
    (tmp_path / "link").symlink_to(tmp_path.parent, target_is_directory=True)
    tampered = _tampered(onnx_path, tmp_path / "tampered.onnx", change)
    for load in (ModelPackage.load, lambda p: Predictor.from_package(p, "cpu")):
        with pytest.raises(CasdError, match=message):
            load(tampered)


def test_external_data_beside_the_model_is_accepted(onnx_path, tmp_path) -> None:
    model = onnx.load(str(onnx_path))
    onnx.save(model, str(tmp_path / "split.onnx"), save_as_external_data=True, location="weights.bin")
    assert (tmp_path / "weights.bin").is_file()
    raw = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)
    whole = Predictor.from_package(onnx_path, "cpu").predict_raw(raw)
    assert np.array_equal(Predictor.from_package(tmp_path / "split.onnx", "cpu").predict_raw(raw), whole)


def test_files_that_are_not_casd_onnx_models_are_refused(tmp_path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CasdError, match="not a readable ONNX model"):
        ModelPackage.load(garbage)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["probabilities"])], "g",
                                   [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3])],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 3])])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(plain))
    with pytest.raises(CasdError, match="not a CASD ONNX model"):
        Predictor.from_package(plain, "cpu")


def test_processing_algorithm_exports(package_path, tmp_path) -> None:
    """``casd:exportonnx`` in headless QGIS writes the same self-describing file as the CLI."""
    out = tmp_path / "plugin.onnx"
    script = plugin_script(tmp_path, f"""
        result = processing.run("casd:exportonnx", {{"MODEL": {str(package_path)!r}, "OUTPUT": {str(out)!r}}})
        print("RESULT" + json.dumps({{"output": result["OUTPUT"]}}))
        del result
    """)
    (result,) = run_qgis_script(script, tmp_path)
    assert result["output"] == str(out)
    assert ModelPackage.load(out).metadata() == ModelPackage.load(package_path).metadata()


# --- evaluation ------------------------------------------------------------------------------


def _evaluated(model: Path, aid_root: Path, split: Path, out: Path, tta: bool, capsys) -> tuple[dict, str]:
    """``casd evaluate --json`` of ``model``: its report and the confusion matrix CSV it wrote."""
    assert main(["evaluate", str(model), "--data", str(aid_root), "--split", str(split), "--device", "cpu",
                 "--batch-size", "16", "--out", str(out), "--json", *(["--tta"] if tta else [])]) == 0
    return json.loads(capsys.readouterr().out), (out / "confusion_matrix.csv").read_text()


@pytest.mark.parametrize("tta", [False, True], ids=["one-view", "tta"])
def test_evaluating_an_export_reports_what_torch_reports(tta, aid_root, package_path, onnx_path, tmp_path,
                                                         capsys, one_torch_thread) -> None:
    """``casd evaluate MODEL.onnx`` runs onnxruntime over the very batches torch gets: on one test
    row of each class, the same labels (confusion matrix), scores and calibration, the same keys."""
    split = small_split(aid_root, tmp_path, train_per_class=0, test_per_class=1)
    torch_report, torch_confusion = _evaluated(package_path, aid_root, split, tmp_path / "torch", tta, capsys)
    onnx_report, onnx_confusion = _evaluated(onnx_path, aid_root, split, tmp_path / "onnx", tta, capsys)
    assert onnx_report.keys() == torch_report.keys()
    assert onnx_report["model"] == str(onnx_path) and onnx_report["num_samples"] == 30
    assert onnx_confusion == torch_confusion
    matrix = np.array([row[1:] for row in csv.reader(onnx_confusion.splitlines()[1:])], dtype=int)
    assert matrix.sum() == 30 and (matrix.sum(0) > 0).sum() > 3  # labels vary: the agreement is not trivial
    for key in ("overall_accuracy", "kappa", "macro_f1", "per_class", "temperature", "tta"):
        assert onnx_report[key] == torch_report[key], key
    for key in ("ece", "ece_uncalibrated"):  # the package's temperature 0.5 is applied, then undone
        assert onnx_report[key] == pytest.approx(torch_report[key], abs=PROBABILITY_TOLERANCE), key
    assert onnx_report["ece"] != pytest.approx(onnx_report["ece_uncalibrated"], abs=1e-3)


def test_the_light_install_says_evaluation_needs_the_full_one(aid_root, onnx_path, tmp_path) -> None:
    """Without torch, evaluating even an .onnx model is refused in one line that says why."""
    light = Path(__file__).resolve().parent.parent / ".venv-light" / "bin" / "casd"
    assert light.is_file(), "no .venv-light: run bash scripts/setup.sh"
    split = small_split(aid_root, tmp_path, train_per_class=0, test_per_class=1)
    done = subprocess.run([str(light), "evaluate", str(onnx_path), "--data", str(aid_root), "--split", str(split)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "needs PyTorch, also for an .onnx model" in done.stderr and "requirements.txt" in done.stderr
