"""``casd:classifyfolder`` — classify every GeoTIFF of a folder, one vector file per raster."""

from __future__ import annotations

from qgis.core import (QgsProcessingOutputNumber, QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterFile, QgsProcessingParameterFolderDestination,
                       QgsProcessingParameterString)

from ..feedback import monitor_for
from .common import CasdAlgorithm, advanced, dialog_names, user_errors
from .tiling_params import (BATCH_SIZE, HELP, NODATA_THRESHOLD, OVERLAP, STRIDE, TILE_SIZE, TILE_UNIT,  # noqa: F401
                            TILING_PARAMETERS, add_tiling_parameters, inference_config, tiling_config)
from .value_params import HELP as VALUES_HELP
from .value_params import (AUTO_NODATA, MIN_SCORE, NODATA, PERCENTILES, SMOOTH, STRETCH, TTA,  # noqa: F401
                           VALUE_RANGE, add_value_parameters, radiometry_config)

INPUT_FOLDER = "INPUT_FOLDER"
RECURSIVE = "RECURSIVE"
MODEL = "MODEL"
BANDS = "BANDS"
DEVICE = "DEVICE"
FORMAT = "FORMAT"
OVERWRITE = "OVERWRITE"
MERGED = "MERGED"
DISSOLVE = "DISSOLVE"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
CLASSIFIED = "CLASSIFIED"
SKIPPED = "SKIPPED"
FAILED = "FAILED"

FORMATS = (("gpkg", "GeoPackage (.gpkg)"), ("geojson", "GeoJSON (.geojson)"), ("fgb", "FlatGeobuf (.fgb)"))
# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {**TILING_PARAMETERS, "folder": INPUT_FOLDER, "out_dir": OUTPUT_FOLDER, "format": FORMAT}


def parse_bands(text: str) -> tuple[int, ...] | None:
    """``"4,1,2"`` → (4, 1, 2); empty → None (the first bands)."""
    from casd_core.errors import CasdError, param

    text = text.strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", ",").split(",") if part)
    except ValueError:
        raise CasdError(f"{param('bands')} {text!r} must be 1-based band numbers separated by commas, "
                        "e.g. 1,2,3") from None


class ClassifyFolderAlgorithm(CasdAlgorithm):
    def name(self) -> str:
        return "classifyfolder"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Classify a folder of rasters"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Classifies every GeoTIFF (.tif, .tiff) in a folder, as 'Classify raster scenes' does for "
            "one layer, and writes one vector file per raster into the output folder (same relative "
            "path and name), styled by class. Rasters whose output already exists are skipped unless "
            "<b>Overwrite</b> is checked, so an interrupted run can simply be started again; a raster "
            "that fails is reported in the log and the others go on. <b>Merged</b> also writes all "
            "tiles into one layer (<i>merged</i>) with a <i>source</i> field; <b>Dissolve</b> merges "
            "touching tiles of the same class into one region feature.<br><br>"
            "<b>Bands</b>: 1-based band numbers in the model's band order, e.g. <i>1,2,3</i>; empty "
            "takes the first bands.<br><br>"
            f"{HELP}<br><br>{VALUES_HELP}<br><br>"
            "The log has one row per raster: tiles, labelled features, the shares skipped as nodata "
            "and uncertain, and the value stretch applied (then each raster's padding). Cancel stops "
            "between batches; the raster being processed gets no file."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterFile(
            INPUT_FOLDER, "Folder of GeoTIFFs", behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterBoolean(RECURSIVE, "Include sub-folders", defaultValue=True))
        self.add_model_parameter(MODEL)
        self.addParameter(QgsProcessingParameterString(
            BANDS, "Bands (e.g. 1,2,3; empty: the first bands, as many as the model needs)", optional=True))
        add_tiling_parameters(self)
        add_value_parameters(self)
        self.add_device_parameter(DEVICE)
        self.addParameter(QgsProcessingParameterEnum(
            FORMAT, "Output format", options=[label for _, label in FORMATS], defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(
            OVERWRITE, "Overwrite existing outputs (otherwise skip rasters already classified)", defaultValue=False))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            MERGED, "Also write one merged layer of all rasters", defaultValue=False)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            DISSOLVE, "Dissolve neighbouring tiles of the same class into regions", defaultValue=False)))
        self.addParameter(QgsProcessingParameterFolderDestination(OUTPUT_FOLDER, "Output folder"))
        self.addOutput(QgsProcessingOutputNumber(CLASSIFIED, "Rasters classified"))
        self.addOutput(QgsProcessingOutputNumber(SKIPPED, "Rasters skipped (output existed)"))
        self.addOutput(QgsProcessingOutputNumber(FAILED, "Rasters that failed"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        out_dir = self.parameterAsString(parameters, OUTPUT_FOLDER, context)
        name_of = dialog_names(self, PARAMETERS)
        with user_errors(self, PARAMETERS):
            from casd_core.inference import classify_folder

            device = self.device(parameters, DEVICE, context)
            bands = parse_bands(self.parameterAsString(parameters, BANDS, context) or "")
            summary = classify_folder(
                self.parameterAsFile(parameters, INPUT_FOLDER, context), out_dir,
                model=self.model_path(parameters, MODEL, context),
                tiling=tiling_config(self, parameters, context, bands=bands),
                inference=inference_config(self, parameters, context, device),
                recursive=self.parameterAsBoolean(parameters, RECURSIVE, context),
                overwrite=self.parameterAsBoolean(parameters, OVERWRITE, context),
                merged=self.parameterAsBoolean(parameters, MERGED, context),
                fmt=FORMATS[self.parameterAsEnum(parameters, FORMAT, context)][0],
                dissolve=self.parameterAsBoolean(parameters, DISSOLVE, context),
                monitor=monitor_for(feedback, name_of),
                radiometry=radiometry_config(self, parameters, context))
        from casd_core.errors import render_params

        feedback.pushInfo(summary.table(name_of))
        for result in summary.results:
            if result.status == "failed":
                feedback.reportError(f"{result.raster}: {render_params(result.message, name_of)}")
            elif result.details is not None:
                values = result.details.values
                shown = (result.raster.relative_to(summary.folder) if result.raster.is_relative_to(summary.folder)
                         else result.raster)
                feedback.pushInfo(f"{shown}: values: {values.get('casd_stretch', '-')}; "
                                  f"padding: {values.get('casd_padding', '-')}")
        return {OUTPUT_FOLDER: out_dir, CLASSIFIED: summary.count("done"), SKIPPED: summary.count("skipped"),
                FAILED: summary.failed}
