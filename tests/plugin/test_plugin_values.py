"""Pixel values, trusted labels and the grid's extra files through the Processing algorithms,
on real imagery with the bundled model (``MODEL`` empty).

``test_tiled.tif`` (0.25 m, 8-bit) in 60 m tiles is 25 tiles; a uint16 ×40 copy of it must be
mapped back (a warning names the dialog's setting) and label like the original."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import rasterio

from casd_core.cli import main

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("one_torch_thread")]

TILES_60M = {"TILE_SIZE": 60, "TILE_UNIT": 0, "DEVICE": 1}


def recording_feedback():
    """A QgsProcessingFeedback that keeps its info and warning lines."""
    from qgis.core import QgsProcessingFeedback

    class RecordingFeedback(QgsProcessingFeedback):
        def __init__(self) -> None:
            super().__init__()
            self.infos: list[str] = []
            self.warnings: list[str] = []

        def pushInfo(self, text: str) -> None:  # noqa: N802 (QGIS's name)
            self.infos.append(text)
            super().pushInfo(text)

        def pushWarning(self, text: str) -> None:  # noqa: N802 (QGIS's name)
            self.warnings.append(text)
            super().pushWarning(text)

    return RecordingFeedback()


@pytest.fixture(scope="module")
def original(rasters) -> Path:
    return rasters / "test_tiled.tif"


@pytest.fixture(scope="module")
def uint16_copy(original, tmp_path_factory) -> Path:
    """``test_tiled.tif`` as 16-bit counts (×40), as a 12/16-bit sensor delivers them."""
    out = tmp_path_factory.mktemp("uint16") / "u16.tif"
    with rasterio.open(original) as ds:
        data, profile = ds.read(), ds.profile
    for key in ("photometric", "jpeg_quality"):
        profile.pop(key, None)
    profile.update(dtype="uint16", compress="deflate")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data.astype(np.uint16) * 40)
    return out


def classify(raster: Path, feedback=None, **parameters) -> dict:
    import processing

    return processing.run("casd:classifyraster", {"INPUT": str(raster), **TILES_60M, "OUTPUT": "TEMPORARY_OUTPUT",
                                                  **parameters}, feedback=feedback)


def cells(layer) -> dict[tuple[int, int], tuple]:
    """(row, col) → (class_id, class_name) of every feature; a null class_id as None."""
    from qgis.core import NULL

    return {(f["row"], f["col"]): (None if f["class_id"] is None or f["class_id"] == NULL else f["class_id"],
                                   f["class_name"]) for f in layer.getFeatures()}


@pytest.fixture(scope="module")
def original_labels(plugin_name, original) -> dict:
    result = classify(original)
    labels = cells(result["OUTPUT"])
    del result
    return labels


def test_a_16bit_copy_is_mapped_with_a_warning_and_labels_like_the_original(original_labels, uint16_copy):
    feedback = recording_feedback()
    result = classify(uint16_copy, feedback)
    got = cells(result["OUTPUT"])
    del result
    assert len(got) == len(original_labels) == 25
    agreement = np.mean([got[key][1] == name for key, (_, name) in original_labels.items()])
    assert agreement >= 0.9, f"{agreement:.0%} of the tiles agree"
    [warning] = feedback.warnings
    assert "u16.tif" in warning and "auto" in warning
    assert '"Value stretch"' in warning and "\x00" not in warning  # the setting by its dialog label
    values = next(line for line in feedback.infos if line.startswith("Values: "))
    assert values.startswith("Values: auto: values ×") and "padding: none" in values
    assert "25 of 25 tiles labelled, 0 skipped as nodata (0%), 0 uncertain (0%)" in feedback.infos


def test_min_score_leaves_unsure_tiles_uncertain_without_a_class(original_labels, original):
    feedback = recording_feedback()
    result = classify(original, feedback, MIN_SCORE=0.6)
    got = cells(result["OUTPUT"])
    del result
    uncertain = {key for key, (_, name) in got.items() if name == "uncertain"}
    assert 0 < len(uncertain) < 25
    assert all(got[key][0] is None for key in uncertain)
    assert all(got[key][0] is not None for key in got.keys() - uncertain)
    assert all(got[key] == original_labels[key] for key in got.keys() - uncertain)  # the sure ones keep theirs
    assert not feedback.warnings  # the 8-bit original is fed raw
    share = len(uncertain) / 25
    assert f"{len(uncertain)} uncertain ({share:.0%})" in feedback.infos[0]


# (the dialog's parameters, the CLI's arguments for the same bad input)
BAD_VALUES = [
    pytest.param({"VALUE_RANGE": "0 lots"}, ["--value-range", "0", "lots"], id="not a number"),
    pytest.param({"VALUE_RANGE": "4095 0"}, ["--value-range", "4095", "0"], id="minimum above maximum"),
    pytest.param({"VALUE_RANGE": "0,0 4095,4095"}, ["--value-range", "0,0", "4095,4095"], id="two bands of three"),
]


@pytest.mark.parametrize("parameters, cli_args", BAD_VALUES)
def test_a_bad_value_range_names_the_dialog_label(parameters, cli_args, provider, original, tmp_path, capsys):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException) as raised:
        classify(original, **parameters)
    message = str(raised.value)
    assert '"Value range"' in message and "--value-range" not in message and "\x00" not in message

    code = main(["predict", str(original), "-o", str(tmp_path / "out.gpkg"), "--device", "cpu", "--quiet",
                 *cli_args])
    cli_message = capsys.readouterr().err
    assert code == 2
    # one parser and one check behind both faces: the same sentence, each naming the setting its way
    assert cli_message.split(": error: ", 1)[1].strip().replace("--value-range", '"Value range"') == message


def test_bad_percentiles_name_the_dialog_label(provider, original):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match='"Percentiles"'):
        classify(original, STRETCH=2, PERCENTILES="98,2")
    with pytest.raises(QgsProcessingException, match='"Percentiles" .*must be two numbers'):
        classify(original, STRETCH=2, PERCENTILES="2")


def test_empty_optional_numbers_are_unset_and_zero_is_a_value(provider, plugin_name):
    import qgis.utils
    from qgis.core import QgsApplication, QgsProcessingContext

    package = qgis.utils.plugins[plugin_name].__module__.rsplit(".", 1)[0]  # <plugin>.plugin
    value_params = importlib.import_module(f"{package}.algorithms.value_params")
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("casd:classifyraster")
    context = QgsProcessingContext()
    unset = value_params.radiometry_config(algorithm, {}, context)
    assert (unset.stretch, unset.percentiles, unset.value_range, unset.nodata, unset.auto_nodata) == \
        ("auto", (2.0, 98.0), None, None, True)
    given = value_params.radiometry_config(algorithm, {"NODATA": 0, "STRETCH": 2, "PERCENTILES": "1 99",
                                                       "VALUE_RANGE": "0, 0, 0  3000,3200, 2800",
                                                       "AUTO_NODATA": False}, context)
    assert (given.stretch, given.percentiles, given.value_range, given.nodata, given.auto_nodata) == \
        ("percentile", (1.0, 99.0), ((0.0, 0.0, 0.0), (3000.0, 3200.0, 2800.0)), 0.0, False)
    assert value_params.label_settings(algorithm, {}, context) == {"min_score": None, "tta": False, "smooth": False}
    assert value_params.label_settings(algorithm, {"MIN_SCORE": 0.5, "TTA": True, "SMOOTH": True}, context) == \
        {"min_score": 0.5, "tta": True, "smooth": True}


def test_preview_and_class_raster_are_written_when_asked(provider, original, tmp_path):
    feedback = recording_feedback()
    png, tif = tmp_path / "preview.png", tmp_path / "classes.tif"
    result = classify(original, feedback, MIN_SCORE=0.6, PREVIEW=str(png), RASTER_OUT=str(tif))
    got = cells(result["OUTPUT"])
    assert (result["PREVIEW"], result["RASTER_OUT"]) == (str(png), str(tif))
    del result
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with rasterio.open(tif) as ds:
        assert ds.shape == (5, 5) and ds.crs.to_epsg() == 28992 and ds.nodata == 255
        classes = ds.read(1)
    for (row, col), (class_id, name) in got.items():  # one pixel per tile; uncertain tiles are nodata
        assert classes[row, col] == (255 if name == "uncertain" else class_id)
    assert tif.with_suffix(".qml").is_file()  # QGIS's default style: the class colours and names
    assert f"Wrote {png}" in feedback.infos and f"Wrote {tif}" in feedback.infos


def test_no_preview_or_raster_unless_asked_and_none_after_a_cancel(provider, original, tmp_path):
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    result = classify(original)
    assert "PREVIEW" not in result and "RASTER_OUT" not in result
    del result

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda _value: feedback.cancel())
    with pytest.raises(QgsProcessingException, match="cancel"):
        classify(original, feedback, TILE_SIZE=10, BATCH_SIZE=8, PREVIEW=str(tmp_path / "p.png"),
                 RASTER_OUT=str(tmp_path / "r.tif"))
    assert list(tmp_path.iterdir()) == []


def test_a_class_raster_of_smoothed_cells_is_refused_before_the_run(provider, original, tmp_path):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException) as raised:
        classify(original, OVERLAP=0.5, SMOOTH=True, RASTER_OUT=str(tmp_path / "r.tif"))
    assert '"Class raster"' in str(raised.value) and '"Smooth overlapping tiles onto cells"' in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_classify_folder_logs_nodata_uncertain_and_stretch_per_raster(provider, original, uint16_copy, tmp_path):
    import processing

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "original.tif").symlink_to(original)
    (folder / "u16.tif").symlink_to(uint16_copy)
    feedback = recording_feedback()
    result = processing.run("casd:classifyfolder", {
        "INPUT_FOLDER": str(folder), **TILES_60M, "MIN_SCORE": 0.6, "OUTPUT_FOLDER": str(tmp_path / "out")},
        feedback=feedback)
    assert (result["CLASSIFIED"], result["FAILED"]) == (2, 0)
    table = next(line for line in feedback.infos if line.startswith("raster "))
    header, _, first, second = table.splitlines()[:4]
    assert header.split()[:8] == ["raster", "status", "tiles", "labelled", "nodata", "uncertain", "seconds",
                                  "stretch"]
    assert first.split()[:5] == ["original.tif", "done", "25", "25", "0%"] and "none" in first
    assert second.split()[:5] == ["u16.tif", "done", "25", "25", "0%"] and "auto: values ×" in second
    assert first.split()[5] != "0%"  # some tiles below the minimum score
    [warning] = feedback.warnings
    assert warning.startswith("u16.tif: ") and '"Value stretch"' in warning
    assert any(line.startswith("u16.tif: values: auto") and "padding: none" in line for line in feedback.infos)
