"""Classification without PyTorch: the light install (``.venv-light``, made by scripts/setup.sh:
Debian's python with --system-site-packages, onnxruntime and the raster/vector packages, no
torch) labels ``test_tiled.tif`` with the bundled ONNX model, through ``casd predict`` and the
plugin's ``casd:classifyraster`` in headless QGIS, exactly as the torch path labels it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from casd_core.inference import classify_raster
from casd_core.package import default_model_path
from casd_core.vectorio import read_layer
from helpers import plugin_script, run_qgis_script

REPO = Path(__file__).resolve().parent.parent
LIGHT = REPO / ".venv-light" / "bin"
ONNX_MODEL = REPO / "resources" / "models" / "casd_aid_default.onnx"


@pytest.fixture(scope="module")
def light_python() -> Path:
    assert (LIGHT / "python").is_file(), "no .venv-light: run bash scripts/setup.sh"
    done = subprocess.run([str(LIGHT / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr, "torch is importable in .venv-light"
    return LIGHT / "python"


@pytest.fixture(scope="module")
def torch_labels(rasters: Path, tmp_path_factory) -> list[tuple[int, int, str]]:
    """The torch path's labels for test_tiled.tif (the .safetensors default model)."""
    out = tmp_path_factory.mktemp("torch") / "torch.gpkg"
    classify_raster(rasters / "test_tiled.tif", out, default_model_path().with_suffix(".safetensors"))
    return _labels(out)


def _labels(path: Path) -> list[tuple[int, int, str]]:
    _geometry, columns, _crs = read_layer(path, ["row", "col", "class_name"])
    return sorted(zip(columns["row"].tolist(), columns["col"].tolist(), columns["class_name"].tolist()))


def test_casd_predict_in_the_light_install_labels_like_torch(light_python, rasters, torch_labels, tmp_path):
    out = tmp_path / "light.gpkg"
    done = subprocess.run([str(LIGHT / "casd"), "predict", str(rasters / "test_tiled.tif"), "-o", str(out),
                           "-m", str(ONNX_MODEL), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _labels(out) == torch_labels and len(torch_labels) == 9
    # a torch-only command says what to install instead of failing on an import
    done = subprocess.run([str(LIGHT / "casd"), "train", "data", "split.csv", "--epochs", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "needs PyTorch" in done.stderr and "Traceback" not in done.stderr


def test_plugin_classifies_in_qgis_without_torch(light_python, raster_copies, torch_labels, tmp_path):
    out = tmp_path / "plugin.gpkg"
    script = plugin_script(tmp_path, f"""
        provider = QgsApplication.processingRegistry().providerById("casd")
        ids = sorted(a.id() for a in provider.algorithms()) if provider else []
        # no MODEL: the embedded default, which without torch is its ONNX export
        result = processing.run("casd:classifyraster", {{"INPUT": {str(raster_copies / "test_tiled.tif")!r},
                                                         "OUTPUT": {str(out)!r}}})
        print("RESULT" + json.dumps({{"ids": ids, "missing": plugin.missing, "tiles": result["TILE_COUNT"],
                                      "torch": "torch" in sys.modules}}))
        del provider, result
    """)
    (result,) = run_qgis_script(script, tmp_path, python=light_python)
    assert result["missing"] == [] and not result["torch"]
    assert {"casd:classifyraster", "casd:classifyfolder", "casd:makechips"} <= set(result["ids"])
    assert "casd:train" not in result["ids"] and "casd:exportonnx" not in result["ids"]
    assert result["tiles"] == 9
    assert _labels(out) == torch_labels
