"""``casd:trainfrompolygons`` — labelled polygons over rasters → chips → fine-tuned model → classified layer.

One click for the analyst's whole loop, by running the provider's own algorithms as children
(``casd:makechips``, ``casd:train``, ``casd:classifyraster``) in this algorithm's context, so
each step is exactly the step the user could run alone (same checks, messages, atomic writes,
resume) and the classified layer is loaded and styled as ``casd:classifyraster``'s is.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from qgis.core import (QgsProcessing, QgsProcessingMultiStepFeedback, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingParameterEnum, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterMultipleLayers,
                       QgsProcessingParameterNumber)

from .common import MODEL_FILTER, CasdAlgorithm, advanced, user_errors
from .tiling_params import (STRIDE, TILE_SIZE, TILE_UNIT, TILING_PARAMETERS, fraction_parameter, stride_parameter,
                            tile_size_parameter, tile_unit_parameter)

LABELS = "LABELS"
CLASS_FIELD = "CLASS_FIELD"
RASTERS = "RASTERS"
MIN_COVERAGE = "MIN_COVERAGE"
TEST_FRACTION = "TEST_FRACTION"
INIT = "INIT"
METHOD = "METHOD"
EPOCHS = "EPOCHS"
FREEZE_EPOCHS = "FREEZE_EPOCHS"
BATCH_SIZE = "BATCH_SIZE"
DEVICE = "DEVICE"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
OUTPUT = "OUTPUT"
OUTPUT_MODEL = "OUTPUT_MODEL"
CHIP_COUNT = "CHIP_COUNT"
VALIDATION_ACCURACY = "VALIDATION_ACCURACY"
TEST_ACCURACY = "TEST_ACCURACY"

CHIPS_DIR, RUN_DIR = "chips", "run"
# The analyst's defaults, not the AID recipe's (casd, batch 32): they must fit a laptop, and
# QGIS runs the training in its own process. Inside QGIS a fine-tune with the backbone training
# peaks at 4.5 GiB with ce at batch 16 and at 16.3 GiB with casd at 32 (docs/BENCHMARKS.md,
# "Fine-tuning from the embedded model"), and from the embedded model casd labelled new classes
# no better than ce (docs/RESULTS.md, "Fine-tuning on your own classes", backbone frozen).
DEFAULT_METHOD, DEFAULT_BATCH_SIZE = "ce", 16
# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {**TILING_PARAMETERS, "raster": RASTERS, "out_dir": OUTPUT_FOLDER}


class TrainFromPolygonsAlgorithm(CasdAlgorithm):
    def name(self) -> str:
        return "trainfrompolygons"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Train a model from polygons and classify"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Teaches the model your own classes in one go: cuts training chips where your "
            "<b>labelled polygons</b> lie over the <b>raster layers</b> ('Make training chips from "
            "polygons'), fine-tunes a model on them ('Train a scene classifier') and classifies the "
            "<b>first raster layer</b> with the new model ('Classify raster scenes'); the result is added "
            "to the map styled by class, in the colours of the polygon layer's <i>Categorized</i> style "
            "when it is on the class field.<br><br>"
            "The <b>output folder</b> gets <i>chips/</i> (the chips, <i>chips.gpkg</i>, <i>split.csv</i>: "
            "a spatial train/test split) and <i>run/</i> (checkpoint, metrics log, test report and the new "
            "model package <i>model.safetensors</i>, which 'Classify raster scenes' and 'Classify a folder "
            "of rasters' take for your other rasters).<br><br>"
            "<b>Tile size</b> empty: the start model's recommended footprint; the new model then classifies "
            "at the chips' scale. <b>Fine-tune: model package to start from</b> empty: the embedded model. "
            "<b>Freeze the backbone for the first epochs</b> trains only the new head then, several times "
            "faster. <i>ce</i> and <b>Batch size</b> 16 (the defaults) fit an 8 GB machine (about 4.5 GB at "
            "the peak); <i>casd</i>, the most accurate on the AID study but no better on a few labels of new "
            "classes, takes about twice the memory and time of <i>ce</i> (about 16 GB at batch 32).<br><br>"
            "Cancel stops within a batch and writes no model package and no layer; running again with the "
            "same settings and output folder resumes the training where it stopped (the chips are cut "
            "again, the same). Changed polygons, rasters or chip settings need a new output folder."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        from casd_core.chips import ChipConfig  # their field defaults are the dialog's defaults
        from casd_core.losses import METHODS
        from casd_core.train import TrainConfig

        self._methods = list(METHODS)
        integer = QgsProcessingParameterNumber.Type.Integer
        # Labels as in casd:makechips and casd:train: the children's messages name them so.
        self.addParameter(QgsProcessingParameterFeatureSource(
            LABELS, "Labelled polygons", types=[QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(
            CLASS_FIELD, "Class field (holds each polygon's class name)", parentLayerParameterName=LABELS,
            type=QgsProcessingParameterField.DataType.Any))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            RASTERS, "Raster layers (the same bands; the first is classified)",
            layerType=QgsProcessing.SourceType.TypeRaster))
        self.addParameter(tile_size_parameter("Tile size (of one chip; empty: the model's recommended footprint)"))
        self.addParameter(tile_unit_parameter(ChipConfig.unit))
        self.addParameter(advanced(stride_parameter(
            "Stride (in the tile size unit; empty: the tile size, no overlap)")))
        self.addParameter(advanced(fraction_parameter(
            MIN_COVERAGE, "Minimum coverage (share of a chip its class's polygons must cover)",
            ChipConfig.min_coverage)))
        self.addParameter(advanced(fraction_parameter(
            TEST_FRACTION, "Test fraction (share of each class's chips held out for test, in whole groups)",
            ChipConfig.test_fraction)))
        self.addParameter(QgsProcessingParameterFile(
            INIT, "Fine-tune: model package to start from (empty: the embedded model)",
            behavior=QgsProcessingParameterFile.Behavior.File, fileFilter=MODEL_FILTER, optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            METHOD, "Method", options=self._methods, defaultValue=self._methods.index(DEFAULT_METHOD)))
        self.addParameter(QgsProcessingParameterNumber(
            EPOCHS, "Epochs", type=integer, defaultValue=TrainConfig.epochs, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            FREEZE_EPOCHS, "Freeze the backbone for the first epochs", type=integer,
            defaultValue=TrainConfig.freeze_epochs, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            BATCH_SIZE, "Batch size", type=integer, defaultValue=DEFAULT_BATCH_SIZE, minValue=1))
        self.add_device_parameter(DEVICE)
        self.addParameter(QgsProcessingParameterFolderDestination(
            OUTPUT_FOLDER, "Output folder (chips/ and run/ with the model package inside)"))
        self.addParameter(QgsProcessingParameterFeatureSink(
            OUTPUT, "Scene classes (the first raster layer, by the new model)",
            type=QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputFile(OUTPUT_MODEL, "Model package"))
        self.addOutput(QgsProcessingOutputNumber(CHIP_COUNT, "Number of chips"))
        self.addOutput(QgsProcessingOutputNumber(VALIDATION_ACCURACY, "Best validation accuracy"))
        self.addOutput(QgsProcessingOutputNumber(TEST_ACCURACY, "Test accuracy"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        import processing

        folder = Path(self.parameterAsFileOutput(parameters, OUTPUT_FOLDER, context))
        chips_dir, run_dir = folder / CHIPS_DIR, folder / RUN_DIR
        rasters = self.parameterAsLayerList(parameters, RASTERS, context)
        init = self.parameterAsFile(parameters, INIT, context)
        steps = QgsProcessingMultiStepFeedback(3, feedback)

        earlier_split = _read_text(chips_dir / "split.csv")
        chips = processing.run("casd:makechips", {
            LABELS: parameters[LABELS], CLASS_FIELD: parameters[CLASS_FIELD], RASTERS: rasters,
            "MODEL": init or None, TILE_SIZE: parameters.get(TILE_SIZE), TILE_UNIT: parameters.get(TILE_UNIT),
            STRIDE: parameters.get(STRIDE), MIN_COVERAGE: parameters.get(MIN_COVERAGE),
            TEST_FRACTION: parameters.get(TEST_FRACTION),
            "OVERWRITE": True,  # a rerun re-cuts the same chips, so that the training resumes
            "OUTPUT_FOLDER": str(chips_dir)}, context=context, feedback=steps, is_child_algorithm=True)
        with user_errors(self, PARAMETERS):
            self._check_chips(Path(chips["SPLIT_CSV"]), earlier_split, run_dir, feedback)

        steps.setCurrentStep(1)
        self._stop_if_cancelled(feedback)
        trained = processing.run("casd:train", {
            "DATA_FOLDER": str(chips_dir), "SPLIT_CSV": chips["SPLIT_CSV"], "INIT": init or None,
            "INIT_DEFAULT": not init, METHOD: parameters.get(METHOD), EPOCHS: parameters.get(EPOCHS),
            FREEZE_EPOCHS: parameters.get(FREEZE_EPOCHS), BATCH_SIZE: parameters.get(BATCH_SIZE),
            DEVICE: parameters.get(DEVICE), "OUTPUT_FOLDER": str(run_dir)},
            context=context, feedback=steps, is_child_algorithm=True)

        steps.setCurrentStep(2)
        self._stop_if_cancelled(feedback)
        # The sink definition is passed on: classifyraster opens this algorithm's output and, when
        # QGIS is to load it, styles it by the new model's classes (its layer post-processor).
        classified = processing.run("casd:classifyraster", {
            "INPUT": rasters[0], "MODEL": trained["OUTPUT_MODEL"], DEVICE: parameters.get(DEVICE),
            OUTPUT: parameters[OUTPUT]}, context=context, feedback=steps, is_child_algorithm=True)
        return {OUTPUT_FOLDER: str(folder), OUTPUT: classified[OUTPUT], OUTPUT_MODEL: trained["OUTPUT_MODEL"],
                CHIP_COUNT: chips["CHIP_COUNT"], VALIDATION_ACCURACY: trained["VALIDATION_ACCURACY"],
                TEST_ACCURACY: trained["TEST_ACCURACY"]}

    def _check_chips(self, split_csv: Path, earlier_split: str | None, run_dir: Path, feedback) -> None:
        """Refuse chips a classifier cannot learn from, and a run folder trained on other chips
        (training would resume it, or return its finished model, as if nothing had changed)."""
        from casd_core.errors import CasdError, param
        from casd_core.train import CHECKPOINT_NAME

        with split_csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        train = Counter(row["label"] for row in rows if row["split"] == "train")
        if len(train) < 2:
            found = ", ".join(f"'{name}'" for name in sorted(train)) or "none"
            raise CasdError(f"the {param('labels')} gave training chips of {len(train)} class(es) ({found}); "
                            f"a classifier needs two or more: draw polygons of at least two classes over the "
                            f"{param('rasters')}, each at least a {param('tile_size')} across")
        feedback.pushInfo("Training chips per class: " + ", ".join(f"{name} {n}" for name, n in sorted(train.items())))
        if earlier_split is not None and earlier_split != split_csv.read_text() and (
                run_dir / CHECKPOINT_NAME).is_file():
            raise CasdError(f"the chips differ from those the run in {run_dir} was trained on (other polygons, "
                            f"rasters or chip settings); choose a new {param('out_dir')}, or delete {run_dir} "
                            "to start over")

    def _stop_if_cancelled(self, feedback) -> None:
        """Cancel pressed between two steps (the children poll it within theirs)."""
        from casd_core.errors import Cancelled

        if feedback.isCanceled():
            with user_errors(self):
                raise Cancelled()


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
