"""``casd:makechips`` on the real "map" of tests/test_chips.py (a mosaic of AID train images with
polygons in a new taxonomy): from a polygon file, from a memory layer, from selected or filtered
features; the outputs match ``casd chips``'s, and they feed ``casd:train`` in a Graphical Modeler model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_chips
from test_chips import ANALYST, CELL, CRS_UTM, TAXONOMY, classes_json, expected_colors, index_colors, read_index

pytestmark = pytest.mark.qgis

world = test_chips.world  # the mosaic and its polygon files, a fixture of this module too

TILES = {"TILE_SIZE": CELL, "TILE_UNIT": 1}  # 150 px: one chip per mosaic cell


class LogRecording:
    """Builds a QgsProcessingFeedback that keeps the info lines of the log."""

    @staticmethod
    def feedback():
        from qgis.core import QgsProcessingFeedback

        class RecordingFeedback(QgsProcessingFeedback):
            def __init__(self) -> None:
                super().__init__()
                self.infos: list[str] = []

            def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS's name)
                self.infos.append(info)
                super().pushInfo(info)

        return RecordingFeedback()


def _params(world: dict, labels, out: Path, **more) -> dict:
    return {"LABELS": labels, "CLASS_FIELD": "class", "RASTERS": [str(world["rgb"])], **TILES,
            "OUTPUT_FOLDER": str(out), **more}


def _memory_copy(path: Path, name: str = "my labels"):
    """The polygons of ``path`` in a memory layer of the same CRS, added to the project."""
    from qgis.core import QgsFeature, QgsProject, QgsVectorLayer

    source = QgsVectorLayer(str(path), "source", "ogr")
    assert source.isValid()
    layer = QgsVectorLayer(f"Polygon?crs={source.crs().authid()}&field=class:string", name, "memory")
    copies = []
    for feature in source.getFeatures():
        copy = QgsFeature(layer.fields())
        copy.setGeometry(feature.geometry())
        copy.setAttributes([feature["class"]])
        copies.append(copy)
    assert layer.dataProvider().addFeatures(copies)
    assert [f.id() for f in layer.getFeatures()] == [f.id() for f in source.getFeatures()]  # 1..10
    QgsProject.instance().addMapLayer(layer)
    del source
    return layer


@pytest.fixture(scope="module")
def from_file(world, tmp_path_factory, plugin_name) -> tuple[Path, dict, list[str]]:
    """casd:makechips on the EPSG:4326 polygon file, as `casd chips` would be run."""
    import processing

    out = tmp_path_factory.mktemp("plugin_chips") / "chips"
    feedback = LogRecording.feedback()
    result = processing.run("casd:makechips", _params(world, str(world["labels"]), out), feedback=feedback)
    return out, result, feedback.infos


def test_a_polygon_file_gives_what_casd_chips_gives(from_file, world, tmp_path):
    from casd_core.chips import ChipConfig, make_chips
    from casd_core.data import read_split

    out, result, infos = from_file
    assert Path(result["OUTPUT_FOLDER"]) == out
    assert Path(result["SPLIT_CSV"]) == out / "split.csv" and Path(result["INDEX"]) == out / "chips.gpkg"
    assert result["CHIP_COUNT"] == 32
    splits, class_names = read_split(Path(result["SPLIT_CSV"]), out)
    assert class_names == sorted(TAXONOMY)
    assert len(splits["train"]) + len(splits["test"]) == 32
    assert all(sample.path.is_file() for sample in splits["train"] + splits["test"])
    cli = make_chips([world["rgb"]], world["labels"], "class", tmp_path / "cli",
                     ChipConfig(tile_size=CELL, unit="px"))
    assert (out / "split.csv").read_text() == (tmp_path / "cli" / "split.csv").read_text()
    table = next(info for info in infos if info.startswith("class"))
    assert cli.table().splitlines()[:6] == table.splitlines()[:6]  # the per-class rows
    assert "too few: transport / roads" in table
    assert '("Minimum coverage")' in table and "min_coverage" not in table  # settings named as the dialog does


def test_the_index_is_a_layer_styled_by_class(from_file):
    from qgis.core import QgsVectorLayer

    _, result, _ = from_file
    layer = QgsVectorLayer(result["INDEX"], "chips", "ogr")
    assert layer.isValid() and layer.featureCount() == 32
    assert layer.crs().authid() == CRS_UTM
    assert {f["class_name"] for f in layer.getFeatures()} == set(TAXONOMY)
    assert layer.renderer().type() == "categorizedSymbol"  # the style chips.gpkg carries
    del layer


def test_a_memory_layer_is_written_out_first_and_the_index_is_loaded(from_file, world, tmp_path):
    import processing
    from qgis.core import QgsProject

    layer = _memory_copy(world["labels"])  # EPSG:4326 over a UTM raster: the CRS must survive the export
    feedback = LogRecording.feedback()
    try:
        result = processing.runAndLoadResults("casd:makechips", _params(world, layer.id(), tmp_path / "chips"),
                                              feedback=feedback)
        loaded = [lay for lay in QgsProject.instance().mapLayers().values()
                  if lay.source().split("|")[0] == result["INDEX"]]
        assert len(loaded) == 1 and loaded[0].featureCount() == 32
        assert loaded[0].renderer().type() == "categorizedSymbol"
        QgsProject.instance().removeMapLayer(loaded[0].id())
        del loaded
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        del layer
    assert any("'my labels' written to" in info for info in feedback.infos)
    assert (tmp_path / "chips" / "split.csv").read_text() == (from_file[0] / "split.csv").read_text()


def categorized(layer, colors: dict[str, str], attribute: str = "class") -> None:
    """Style ``layer`` as an analyst does: Categorized on ``attribute``, a category per class in
    ``colors``, and QGIS's "all other values" category (no value) in black."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsRendererCategory, QgsSymbol
    from qgis.PyQt.QtGui import QColor

    categories = []
    for value, color in [*colors.items(), (None, "#000000")]:
        symbol = QgsSymbol.defaultSymbol(layer.geometryType())
        symbol.setColor(QColor(color))
        categories.append(QgsRendererCategory(value, symbol, value or ""))
    layer.setRenderer(QgsCategorizedSymbolRenderer(attribute, categories))


def category_colors(layer) -> dict[str, str]:
    """Class → #rrggbb of a layer's categorized renderer (not the abstentions' grey)."""
    from casd_core.style import UNCERTAIN

    return {category.value(): category.symbol().color().name() for category in layer.renderer().categories()
            if category.value() not in (None, "", UNCERTAIN)}


def test_a_categorized_style_on_the_class_field_gives_the_classes_their_colours(provider, world, tmp_path):
    import processing
    from qgis.core import QgsProject, QgsSingleSymbolRenderer, QgsSymbol, QgsVectorLayer

    layer = QgsVectorLayer(str(world["labels"]), "labels", "ogr")
    categorized(layer, ANALYST)  # transport / roads: no category of its own
    QgsProject.instance().addMapLayer(layer)
    try:
        result = processing.run("casd:makechips", _params(world, layer.id(), tmp_path / "styled"))
        out = Path(result["OUTPUT_FOLDER"])
        assert classes_json(out) == index_colors(out) == expected_colors(ANALYST)
        index = QgsVectorLayer(result["INDEX"], "chips", "ogr")  # as QGIS shows it: the style it carries
        assert category_colors(index) == expected_colors(ANALYST)
        del index
        for other in ("upper(\"class\")", None):  # categorized on something else, or one symbol: no colours
            if other is None:
                layer.setRenderer(QgsSingleSymbolRenderer(QgsSymbol.defaultSymbol(layer.geometryType())))
            else:
                categorized(layer, ANALYST, other)
            result = processing.run("casd:makechips", _params(world, layer.id(), tmp_path / "plain", OVERWRITE=True))
            assert not (tmp_path / "plain" / "classes.json").exists(), other
            assert index_colors(tmp_path / "plain") == expected_colors({})
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        del layer


def test_a_labels_file_given_by_path_brings_the_style_saved_with_it(provider, world, tmp_path):
    """Batch runs pass files, not project layers: the default style saved in the GeoPackage counts."""
    import shutil

    import processing
    from qgis.core import QgsVectorLayer

    labels = Path(shutil.copy(world["labels"], tmp_path / "styled_labels.gpkg"))
    layer = QgsVectorLayer(str(labels), "labels", "ogr")
    categorized(layer, ANALYST)
    message = layer.saveStyleToDatabase("default", "", True, "")
    assert message == "", message
    del layer
    result = processing.run("casd:makechips", _params(world, str(labels), tmp_path / "chips"))
    assert classes_json(Path(result["OUTPUT_FOLDER"])) == expected_colors(ANALYST)


def _chips_of(index: dict, polygons: set[int]) -> dict[str, int]:
    return {path: int(p) for path, p in zip(index["path"], index["polygon_id"]) if int(p) in polygons}


def _behind_a_decoy(labels: Path, folder: Path) -> Path:
    """A GeoPackage whose first layer is a decoy over the whole mosaic and whose second is ``labels``."""
    import pyogrio.raw
    import shapely

    meta, _, geometry, data = pyogrio.raw.read(str(labels))
    path = folder / "two_layers.gpkg"
    decoy = shapely.box(*shapely.total_bounds(shapely.from_wkb(geometry[:8])))  # polygons 1-8 lie on the mosaic
    pyogrio.raw.write(str(path), np.array([shapely.to_wkb(decoy)], dtype=object),
                      [np.array(["decoy"], dtype=object)], ["class"], layer="decoy", driver="GPKG",
                      geometry_type="Polygon", crs=meta["crs"])
    pyogrio.raw.write(str(path), geometry, data, meta["fields"], layer="labels", driver="GPKG",
                      geometry_type="Polygon", crs=meta["crs"])
    assert [name for name, _ in pyogrio.list_layers(str(path))][:2] == ["decoy", "labels"]
    return path


@pytest.mark.parametrize("how", ["selected", "subset", "second layer", "whole file"])
def test_project_layers_give_the_chips_of_their_features_under_their_ids(how, from_file, world, tmp_path):
    import processing
    from qgis.core import QgsProcessingFeatureSourceDefinition, QgsProject, QgsVectorLayer

    if how == "selected":
        layer = _memory_copy(world["labels_utm"])
        kept = {3, 4, 5, 8}  # water and vegetation polygons
        layer.selectByIds(sorted(kept))
    elif how == "second layer":
        path = _behind_a_decoy(world["labels_utm"], tmp_path)
        layer = QgsVectorLayer(f"{path}|layername=labels", "labels", "ogr")  # the core reads a file's first layer
        kept = {1, 2, 3, 4, 5, 7, 8}
        QgsProject.instance().addMapLayer(layer)
    else:
        layer = QgsVectorLayer(str(world["labels_utm"]), "labels", "ogr")
        kept = {1, 2, 3, 4, 5, 7, 8}  # every polygon that gives chips
        if how == "subset":
            kept = {5, 7, 8}  # whole cells only: their chips do not depend on the polygons left out
            layer.setSubsetString(f"fid IN ({', '.join(map(str, sorted(kept)))})")
        QgsProject.instance().addMapLayer(layer)
    feedback = LogRecording.feedback()
    try:
        source = QgsProcessingFeatureSourceDefinition(layer.id(), how == "selected")
        result = processing.run("casd:makechips", _params(world, source, tmp_path / "chips"), feedback=feedback)
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        del layer
    index = read_index(tmp_path / "chips")
    assert set(int(p) for p in index["polygon_id"]) == kept  # the ids QGIS shows, not the export's 1, 2, …
    assert _chips_of(index, kept) == _chips_of(read_index(from_file[0]), kept)
    assert result["CHIP_COUNT"] == len(index["path"])
    exported = any("written to" in info for info in feedback.infos)
    assert exported == (how != "whole file")  # a plain file is read as it is


def test_a_bad_class_field_is_named_as_the_dialog_names_it(provider, world, tmp_path, capsys):
    import processing
    from casd_core.cli import main
    from qgis.core import QgsProcessingException

    code = main(["chips", str(world["rgb"]), "--labels", str(world["labels"]), "--class-field", "klass",
                 "-o", str(tmp_path / "cli"), "--quiet"])
    cli_message = capsys.readouterr().err
    assert code == 2 and "--class-field" in cli_message, cli_message
    with pytest.raises(QgsProcessingException) as raised:
        processing.run("casd:makechips", _params(world, str(world["labels"]), tmp_path / "chips",
                                                 CLASS_FIELD="klass"))
    message = str(raised.value)
    assert '"Class field"' in message and "'klass'" in message and "--class-field" not in message
    assert cli_message.split(": error: ", 1)[1].strip().replace("--class-field", '"Class field"') == message
    assert not (tmp_path / "chips").exists() or not list((tmp_path / "chips").iterdir())


def test_cancel_leaves_no_chips(provider, world, tmp_path):
    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda _: feedback.cancel())  # Cancel at the first progress report
    with pytest.raises(QgsProcessingException, match="cancel"):
        processing.run("casd:makechips", _params(world, str(world["labels"]), tmp_path / "chips"),
                       feedback=feedback)
    assert not list(tmp_path.rglob("*.tif")) and not list(tmp_path.rglob("split.csv"))


def test_chips_feed_train_in_a_graphical_modeler_model(provider, world, tmp_path):
    """makechips → train as the Modeler saves it: train's image folder and split CSV are makechips' outputs."""
    import processing
    from casd_core.losses import METHODS
    from casd_core.package import ModelPackage
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput)

    static = QgsProcessingModelChildParameterSource.fromStaticValue
    model = QgsProcessingModelAlgorithm("chips to model", "tests")
    chips = QgsProcessingModelChildAlgorithm("casd:makechips")
    chips.setChildId("chips")
    for name, value in _params(world, str(world["labels"]), tmp_path).items():
        if name != "OUTPUT_FOLDER":
            chips.addParameterSources(name, [static(value)])
    train = QgsProcessingModelChildAlgorithm("casd:train")
    train.setChildId("train")
    train.addParameterSources("DATA_FOLDER", [
        QgsProcessingModelChildParameterSource.fromChildOutput("chips", "OUTPUT_FOLDER")])
    train.addParameterSources("SPLIT_CSV", [
        QgsProcessingModelChildParameterSource.fromChildOutput("chips", "SPLIT_CSV")])
    for name, value in {"METHOD": METHODS.index("ce"), "EPOCHS": 1, "BATCH_SIZE": 8, "PRETRAINED": False,
                        "DEVICE": 1}.items():
        train.addParameterSources(name, [static(value)])
    for child, name in ((chips, "chips"), (train, "run")):  # the folders are the model's outputs
        output = QgsProcessingModelOutput(name)
        output.setChildOutputName("OUTPUT_FOLDER")
        child.setModelOutputs({name: output})
        model.addChildAlgorithm(child)

    result = processing.run(model, {"chips:chips": str(tmp_path / "chips"), "train:run": str(tmp_path / "run")})
    assert len((tmp_path / "chips" / "split.csv").read_text().splitlines()) == 1 + 32
    package = ModelPackage.load(Path(result["train:run"]) / "model.safetensors")
    assert package.class_names == sorted(TAXONOMY)
    assert package.training["method"] == "ce" and package.training["epochs"] == 1
