"""The four casd algorithms run through Processing on real data, and a cancel leaves no output."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.qgis


class CancelAfter:
    """Builds a QgsProcessingFeedback that asks to cancel after ``calls`` progress reports."""

    @staticmethod
    def feedback(calls: int = 1):
        from qgis.core import QgsProcessingFeedback

        feedback = QgsProcessingFeedback()
        seen = []

        def on_progress(_value: float) -> None:
            seen.append(_value)
            if len(seen) >= calls:
                feedback.cancel()

        feedback.progressChanged.connect(on_progress)
        feedback.progress_reports = seen
        return feedback


class Recording:
    """Builds a QgsProcessingFeedback that keeps every progress value and progress-text line."""

    @staticmethod
    def feedback():
        from qgis.core import QgsProcessingFeedback

        class RecordingFeedback(QgsProcessingFeedback):
            def __init__(self) -> None:
                super().__init__()
                self.progress_reports: list[float] = []
                self.texts: list[str] = []
                self.progressChanged.connect(self.progress_reports.append)

            def setProgressText(self, text: str) -> None:  # noqa: N802 (QGIS's name)
                self.texts.append(text)
                super().setProgressText(text)

        return RecordingFeedback()


def _vector_layer(path: str):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(path, "result", "ogr")
    assert layer.isValid(), path
    return layer


def _expected_tiles(raster: Path, package: Path, **tiling) -> list:
    """What the core yields for the same raster and settings (the CLI's path)."""
    from casd_core.inference import InferenceConfig, Predictor, iter_tile_predictions
    from casd_core.tiling import TilingConfig

    predictor = Predictor.from_package(package, "cpu")
    return list(iter_tile_predictions(str(raster), predictor, TilingConfig(**tiling), InferenceConfig(device="cpu"),
                                      None))


def test_classify_raster_writes_one_feature_per_labelled_tile(provider, rasters, tiny_package, tmp_path):
    import processing
    from casd_core.vectorio import OUTPUT_FIELDS

    raster = rasters / "test_tiled.tif"
    out = tmp_path / "labels.gpkg"
    result = processing.run("casd:classifyraster", {
        "INPUT": str(raster), "MODEL": str(tiny_package), "TILE_SIZE": 60, "TILE_UNIT": 0,
        "DEVICE": 1, "OUTPUT": str(out)})

    layer = _vector_layer(result["OUTPUT"])
    assert layer.crs().authid() == "EPSG:28992"
    assert [f.name() for f in layer.fields() if f.name() != "fid"] == [name for name, _ in OUTPUT_FIELDS]
    expected = _expected_tiles(raster, tiny_package, tile_size=60.0, unit="m")
    assert layer.featureCount() == result["TILE_COUNT"] == len(expected) == 25  # 250 m / 60 m → 5 × 5
    names = {f["class_name"] for f in layer.getFeatures()}
    assert names <= set(_package(tiny_package).class_names)
    raster_extent = _raster_extent(raster)
    for feature in layer.getFeatures():
        assert feature.geometry().isGeosValid()
        assert raster_extent.contains(feature.geometry().boundingBox())
        assert 0.0 <= feature["score"] <= 1.0
    del layer


def test_classify_raster_honours_extent_bands_and_pixel_tiles(provider, rasters, tiny_package):
    import processing

    raster = rasters / "m_4709963_se_14_1_20200831.tif"  # 4 bands; feed NIR, red, green
    extent = _raster_extent(raster)
    half = f"{extent.xMinimum()},{extent.center().x()},{extent.yMinimum()},{extent.yMaximum()} [EPSG:26914]"
    result = processing.run("casd:classifyraster", {
        "INPUT": str(raster), "MODEL": str(tiny_package), "BANDS": [4, 1, 2], "TILE_SIZE": 100, "TILE_UNIT": 1,
        "EXTENT": half, "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = result["OUTPUT"]
    assert layer.crs().authid() == "EPSG:26914"
    assert layer.featureCount() == result["TILE_COUNT"] > 0
    assert layer.extent().xMaximum() <= extent.center().x() + 5.0  # one pixel of snapping at most
    del layer


def test_result_layer_is_categorised_by_class_in_the_package_colours(provider, rasters, tiny_package):
    import processing
    from qgis.core import QgsCategorizedSymbolRenderer, QgsProject

    package = _package(tiny_package)
    result = processing.runAndLoadResults("casd:classifyraster", {
        "INPUT": str(rasters / "test_tiled.tif"), "MODEL": str(tiny_package), "TILE_SIZE": 50,
        "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = QgsProject.instance().mapLayer(result["OUTPUT"])
    try:
        renderer = layer.renderer()
        assert isinstance(renderer, QgsCategorizedSymbolRenderer)
        assert renderer.classAttribute() == "class_name"
        present = {f["class_name"] for f in layer.getFeatures()}
        categories = {c.value(): c for c in renderer.categories()}
        assert set(categories) == present
        for name, category in categories.items():
            assert category.label() == name
            expected = package.class_colors[package.class_names.index(name)].lower()
            assert category.symbol().color().name() == expected
    finally:
        QgsProject.instance().removeMapLayer(result["OUTPUT"])
        del layer


def test_progress_moves_the_bar_up_to_100_and_logs_the_step_once(provider, rasters, tiny_package):
    import processing

    feedback = Recording.feedback()
    processing.run("casd:classifyraster", {
        "INPUT": str(rasters / "test_tiled.tif"), "MODEL": str(tiny_package), "TILE_SIZE": 10,
        "BATCH_SIZE": 64, "DEVICE": 1, "OUTPUT": "TEMPORARY_OUTPUT"}, feedback=feedback)
    reports = feedback.progress_reports
    assert len(reports) >= 5  # 625 tiles in batches of 64: one report per batch
    assert reports == sorted(reports) and reports[0] < reports[-1]
    assert reports[-1] == pytest.approx(100.0)
    assert feedback.texts == ["0/625 tiles"]  # one step (this raster's tiles): one line, not one per batch


def test_setting_names_come_from_the_parameter_labels(provider, plugin_name):
    import qgis.utils
    from casd_core.errors import CasdError, param
    from qgis.core import QgsApplication

    package = qgis.utils.plugins[plugin_name].__module__.rsplit(".", 1)[0]  # <plugin>.plugin
    common = importlib.import_module(f"{package}.algorithms.common")
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("casd:classifyfolder")
    name_of = common.dialog_names(algorithm, {"unit": "TILE_UNIT", "out_dir": "OUTPUT_FOLDER"})
    error = CasdError(f"{param('nodata_threshold')}, {param('unit')}, {param('out_dir')}, {param('aoi_crs')}")
    assert error.render(name_of) == '"Nodata threshold", "Tile size unit", "Output folder", aoi crs'


def test_cancel_stops_early_and_leaves_no_output(provider, rasters, tiny_package, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    out = tmp_path / "cancelled.gpkg"
    feedback = CancelAfter.feedback(calls=1)
    with pytest.raises(QgsProcessingException, match="cancel"):
        processing.run("casd:classifyraster", {
            "INPUT": str(rasters / "test_tiled.tif"), "MODEL": str(tiny_package), "TILE_SIZE": 10,
            "BATCH_SIZE": 8, "OUTPUT": str(out)}, feedback=feedback)
    assert len(feedback.progress_reports) < 5  # 625 tiles in batches of 8: it stopped at once
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_classify_folder_writes_one_styled_file_per_raster_and_skips_existing(provider, rasters, tiny_package,
                                                                              tmp_path):
    import processing

    params = {"INPUT_FOLDER": str(rasters), "MODEL": str(tiny_package), "TILE_SIZE": 200, "TILE_UNIT": 1,
              "OUTPUT_FOLDER": str(tmp_path)}
    feedback = Recording.feedback()
    first = processing.run("casd:classifyfolder", params, feedback=feedback)
    outputs = sorted(p.name for p in tmp_path.glob("*.gpkg"))
    assert outputs == ["m_4709963_se_14_1_20200831.gpkg", "test_tiled.gpkg"]
    assert (first["CLASSIFIED"], first["SKIPPED"], first["FAILED"]) == (2, 0, 0)
    reports = feedback.progress_reports
    assert reports == sorted(reports) and reports[-1] == pytest.approx(100.0)
    for raster in ("m_4709963_se_14_1_20200831.tif", "test_tiled.tif"):  # one log line per raster
        assert len([text for text in feedback.texts if text.startswith(f"{raster}:")]) == 1, feedback.texts
    for name in outputs:
        layer = _vector_layer(str(tmp_path / name))
        assert layer.featureCount() > 0
        assert layer.renderer().type() == "categorizedSymbol"  # the core stores the style in the file
        del layer

    again = processing.run("casd:classifyfolder", params)
    assert (again["CLASSIFIED"], again["SKIPPED"]) == (0, 2)


def _tiny_split(aid_root: Path, path: Path, classes: int = 3, train: int = 3, test: int = 2) -> Path:
    """A split CSV over the real AID images: the first ``classes`` classes, a few images each."""
    taken: dict[tuple[str, str], int] = {}
    rows = []
    with open(aid_root / "split_20.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            key = (row["label"], row["split"])
            if len({label for label, _ in taken} | {row["label"]}) > classes:
                continue
            if taken.get(key, 0) < {"train": train, "test": test}.get(row["split"], 0):
                taken[key] = taken.get(key, 0) + 1
                rows.append(row)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_train_one_short_epoch_writes_a_model_package(provider, aid_root, tmp_path):
    import processing
    from casd_core.package import ModelPackage

    split = _tiny_split(aid_root, tmp_path / "split.csv")
    result = processing.run("casd:train", {
        "DATA_FOLDER": str(aid_root), "SPLIT_CSV": str(split), "EPOCHS": 1, "BATCH_SIZE": 4,
        "PRETRAINED": False, "TILE_FOOTPRINT": 120, "DEVICE": 1, "OUTPUT_FOLDER": str(tmp_path / "run")})
    package = ModelPackage.load(result["OUTPUT_MODEL"])
    assert package.class_names == ["Airport", "BareLand", "BaseballField"]
    assert package.training["epochs"] == 1 and package.training["method"] == "casd"
    assert package.tile_footprint_m == 120
    assert 0.0 <= result["VALIDATION_ACCURACY"] <= 1.0
    assert 0.0 <= result["TEST_ACCURACY"] <= 1.0


def test_train_cancel_writes_no_model(provider, aid_root, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    feedback = CancelAfter.feedback(calls=1)
    feedback.cancel()  # Cancel pressed before the first batch: not one training step runs
    with pytest.raises(QgsProcessingException, match="cancel"):
        processing.run("casd:train", {
            "DATA_FOLDER": str(aid_root), "SPLIT_CSV": str(_tiny_split(aid_root, tmp_path / "split.csv")),
            "EPOCHS": 3, "BATCH_SIZE": 2, "PRETRAINED": False, "DEVICE": 1,
            "OUTPUT_FOLDER": str(tmp_path / "run")}, feedback=feedback)
    assert feedback.progress_reports == []
    assert not list(tmp_path.rglob("*.safetensors"))


def test_evaluate_writes_metrics_and_confusion_png(provider, aid_root, tiny_package, tmp_path):
    import processing

    split = _tiny_split(aid_root, tmp_path / "split.csv", classes=30, train=0, test=2)
    result = processing.run("casd:evaluate", {
        "MODEL": str(tiny_package), "DATA_FOLDER": str(aid_root), "SPLIT_CSV": str(split), "DEVICE": 1,
        "OUTPUT_FOLDER": str(tmp_path / "report")})
    assert 0.0 <= result["OVERALL_ACCURACY"] <= 1.0
    assert -1.0 <= result["KAPPA"] <= 1.0
    assert Path(result["METRICS_JSON"]).is_file()
    assert Path(result["CONFUSION_PNG"]).stat().st_size > 1000


def test_evaluate_takes_an_onnx_export(provider, aid_root, tiny_package, tmp_path):
    """The dialog's model field takes .onnx files: the export is evaluated in onnxruntime on the
    same images, with torch's confusion matrix."""
    import processing

    from casd_core.onnx.export import export_onnx

    split = _tiny_split(aid_root, tmp_path / "split.csv", classes=30, train=0, test=1)
    models = {"torch": tiny_package, "onnx": export_onnx(tiny_package, tmp_path / "tiny.onnx")}
    results = {name: processing.run("casd:evaluate", {
        "MODEL": str(model), "DATA_FOLDER": str(aid_root), "SPLIT_CSV": str(split), "DEVICE": 1,
        "OUTPUT_FOLDER": str(tmp_path / name)}) for name, model in models.items()}
    assert results["onnx"]["OVERALL_ACCURACY"] == results["torch"]["OVERALL_ACCURACY"]
    assert results["onnx"]["KAPPA"] == results["torch"]["KAPPA"]
    confusion = {name: (tmp_path / name / "confusion_matrix.csv").read_text() for name in models}
    assert confusion["onnx"] == confusion["torch"] and confusion["onnx"].count("\n") == 31


def test_classify_raster_runs_inside_a_model(provider, rasters, tiny_package, tmp_path):
    """A Graphical Modeler model with the algorithm as a child runs (what the Modeler saves)."""
    import processing
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                           QgsProcessingModelParameter, QgsProcessingParameterRasterLayer)

    model = QgsProcessingModelAlgorithm("scene labels", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "Raster"), QgsProcessingModelParameter("raster"))
    child = QgsProcessingModelChildAlgorithm("casd:classifyraster")
    child.setChildId("classify")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    child.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromStaticValue(str(tiny_package))])
    child.addParameterSources("TILE_SIZE", [QgsProcessingModelChildParameterSource.fromStaticValue(125)])
    output = QgsProcessingModelOutput("labels")
    output.setChildOutputName("OUTPUT")
    child.setModelOutputs({"labels": output})
    model.addChildAlgorithm(child)

    out = tmp_path / "model_labels.gpkg"
    result = processing.run(model, {"raster": str(rasters / "test_tiled.tif"), "classify:labels": str(out)})
    layer = _vector_layer(result["classify:labels"])
    assert layer.featureCount() == 4  # 250 m / 125 m → 2 × 2
    del layer


def _package(path: Path):
    from casd_core.package import ModelPackage

    return ModelPackage.load(path)


def _raster_extent(path: Path):
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(path), "raster")
    extent = layer.extent()
    del layer
    return extent
