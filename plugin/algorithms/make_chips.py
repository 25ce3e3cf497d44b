"""``casd:makechips`` — labelled polygons over raster layers → a chip folder that ``casd:train`` trains on.

The QGIS face of ``casd chips``: it gathers the layers and settings and calls the core's
``make_chips``, which reads files. A polygon layer GDAL cannot read as it stands (a memory
layer, "Selected features only", a subset filter, unsaved edits, another provider, a layer of a
multi-layer file that is not its first) is first written to a GeoPackage in Processing's temp
folder by QGIS's own writer, in the layer's CRS and with its feature ids, so the polygon ids the
report and ``chips.gpkg`` give are the ones QGIS shows. A categorized style of the layer on the
class field gives the core the analyst's class colours (``ChipConfig.class_colors``).
"""

from __future__ import annotations

import os
import warnings

from qgis.core import (QgsCategorizedSymbolRenderer, QgsExpression, QgsFeature, QgsField, QgsFields, QgsProcessing,
                       QgsProcessingException, QgsProcessingFeatureSourceDefinition, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingOutputVectorLayer, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterFeatureSource, QgsProcessingParameterField,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterMultipleLayers,
                       QgsProcessingParameterNumber, QgsProcessingUtils, QgsProviderRegistry, QgsVectorFileWriter,
                       QgsVectorLayer)
from qgis.PyQt.QtXml import QDomDocument

from ..compat import FIELD_INT64
from ..feedback import monitor_for
from ..styling import style_when_loaded
from .classify_raster import raster_file
from .common import CasdAlgorithm, advanced, dialog_names, user_errors
from .tiling_params import (NODATA_THRESHOLD, STRIDE, TILE_SIZE, TILE_UNIT, TILE_UNITS, TILING_PARAMETERS,
                            fraction_parameter, stride_parameter, tile_size_parameter, tile_unit_parameter)

LABELS = "LABELS"
CLASS_FIELD = "CLASS_FIELD"
RASTERS = "RASTERS"
MODEL = "MODEL"
MIN_COVERAGE = "MIN_COVERAGE"
MAX_OTHER_COVERAGE = "MAX_OTHER_COVERAGE"
SPLIT_BY = "SPLIT_BY"
BLOCK_SIZE = "BLOCK_SIZE"
TEST_FRACTION = "TEST_FRACTION"
SEED = "SEED"
MIN_CHIPS = "MIN_CHIPS"
OVERWRITE = "OVERWRITE"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
SPLIT_CSV = "SPLIT_CSV"
INDEX = "INDEX"
CHIP_COUNT = "CHIP_COUNT"

# The dialog's words for the core's spatial groups (casd_core.chips.config.SPLIT_BY), by key.
SPLIT_LABELS = {
    "polygon": "polygon: whole polygons (touching ones of a class together)",
    "block": "block: whole squares of the block size",
}
# The core's settings whose parameter is not simply the key in upper case (for user_errors);
# "raster" is what raster_file() calls the layer it cannot use.
PARAMETERS = {**TILING_PARAMETERS, "raster": RASTERS, "out_dir": OUTPUT_FOLDER}


class MakeChipsAlgorithm(CasdAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self._index: str | None = None  # chips.gpkg, for postProcessAlgorithm to load

    def name(self) -> str:
        return "makechips"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Make training chips from polygons"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Cuts training chips for your own classes out of raster layers where polygons say what "
            "they show, for 'Train a scene classifier' (the same as <i>casd chips</i>).<br><br>"
            "<b>Labelled polygons</b>: any polygon layer, in any CRS (selected features only and "
            "filtered layers work); the <b>class field</b> holds each polygon's class name. "
            "<b>Raster layers</b>: GDAL rasters (e.g. GeoTIFF) with the same bands. Each raster is cut "
            "on the tile grid 'Classify raster scenes' uses: <b>tile size</b> in metres or pixels, "
            "empty takes the <b>model</b>'s recommended footprint (224 px without a model); the "
            "<b>stride</b> sets overlap. A tile becomes a chip when polygons of one class cover at "
            "least the <b>minimum coverage</b> of it.<br><br>"
            "The output folder gets one sub-folder of GeoTIFF chips per class (every band, source "
            "dtype), <i>chips.gpkg</i> (each chip's footprint, class and split; added to the map styled "
            "by class) and <i>split.csv</i>, a spatial train/test split: whole polygons (touching ones "
            "of a class together) or whole blocks go to one side, never single chips, so neighbouring "
            "chips cannot leak into the test set. Feed the folder and <i>split.csv</i> to 'Train a "
            "scene classifier' (also in the Graphical Modeler).<br><br>"
            "Left out, and counted in the log: mixed chips (other classes over the <b>maximum other-class "
            "coverage</b>), chips below the minimum coverage or over the <b>nodata threshold</b>, and "
            "polygons outside every raster; classes with fewer than the <b>minimum chips</b>, or a "
            "single polygon, are reported as too few. The folder must be new or empty unless "
            "<b>Overwrite</b> is checked; Cancel leaves no chips behind.<br><br>"
            "Colours: when the polygon layer is styled <i>Categorized</i> on the class field, its "
            "categories' colours are the classes' colours in <i>chips.gpkg</i> and, through "
            "<i>classes.json</i>, in the model trained on the chips and the layers it classifies."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        from casd_core.chips import ChipConfig  # its field defaults are the dialog's defaults
        from casd_core.chips.config import SPLIT_BY as SPLITS

        self._splits = list(SPLITS)
        double, integer = QgsProcessingParameterNumber.Type.Double, QgsProcessingParameterNumber.Type.Integer
        self.addParameter(QgsProcessingParameterFeatureSource(
            LABELS, "Labelled polygons", types=[QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(
            CLASS_FIELD, "Class field (holds each polygon's class name)", parentLayerParameterName=LABELS,
            type=QgsProcessingParameterField.DataType.Any))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            RASTERS, "Raster layers (the same bands)", layerType=QgsProcessing.SourceType.TypeRaster))
        self.add_model_parameter(MODEL)
        self.addParameter(tile_size_parameter("Tile size (of one chip; empty: the model's recommended footprint)"))
        self.addParameter(tile_unit_parameter(ChipConfig.unit))
        self.addParameter(stride_parameter("Stride (in the tile size unit; empty: the tile size, no overlap)"))
        self.addParameter(fraction_parameter(
            MIN_COVERAGE, "Minimum coverage (share of a chip its class's polygons must cover)",
            ChipConfig.min_coverage))
        self.addParameter(fraction_parameter(
            MAX_OTHER_COVERAGE, "Maximum other-class coverage (a chip other classes cover more is mixed "
            "and dropped)", ChipConfig.max_other_coverage))
        self.addParameter(fraction_parameter(
            NODATA_THRESHOLD, "Nodata threshold (skip chips with more than this fraction of nodata pixels)",
            ChipConfig.nodata_threshold))
        self.addParameter(QgsProcessingParameterEnum(
            SPLIT_BY, "Split by (spatial groups kept on one side of the train/test split)",
            options=[SPLIT_LABELS.get(key, key) for key in self._splits],
            defaultValue=self._splits.index(ChipConfig.split_by)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            BLOCK_SIZE, "Block size (side of a block in metres, when splitting by block)",
            type=double, minValue=0.0, defaultValue=ChipConfig.block_size)))
        self.addParameter(fraction_parameter(
            TEST_FRACTION, "Test fraction (share of each class's chips held out for test, in whole groups)",
            ChipConfig.test_fraction))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            SEED, "Random seed (of the split)", type=integer, defaultValue=ChipConfig.seed, minValue=0)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            MIN_CHIPS, "Minimum chips per class (fewer are reported as too few)", type=integer,
            defaultValue=ChipConfig.min_chips, minValue=1)))
        self.addParameter(QgsProcessingParameterBoolean(
            OVERWRITE, "Overwrite (first remove the chips an earlier run wrote into the folder)",
            defaultValue=ChipConfig.overwrite))
        self.addParameter(QgsProcessingParameterFolderDestination(
            OUTPUT_FOLDER, "Chip folder (a sub-folder per class, chips.gpkg, split.csv; new or empty)"))
        self.addOutput(QgsProcessingOutputFile(SPLIT_CSV, "Split CSV (path,label,split,group)"))
        self.addOutput(QgsProcessingOutputVectorLayer(
            INDEX, "Chip index (chips.gpkg)", QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(CHIP_COUNT, "Number of chips"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        self._index = None
        name_of = dialog_names(self, PARAMETERS)
        with user_errors(self, PARAMETERS):
            from casd_core.chips import ChipConfig, make_chips

            rasters = [raster_file(layer) for layer in self.parameterAsLayerList(parameters, RASTERS, context)]
            labels, layer = self._labels_file(parameters, context, feedback)
            class_field = self.parameterAsString(parameters, CLASS_FIELD, context)
            config = ChipConfig(
                tile_size=self.parameterAsDouble(parameters, TILE_SIZE, context) or None,  # empty reads as 0
                unit=TILE_UNITS[self.parameterAsEnum(parameters, TILE_UNIT, context)][0],
                stride=self.parameterAsDouble(parameters, STRIDE, context) or None,
                model=self.parameterAsFile(parameters, MODEL, context) or None,  # None: the embedded model
                min_coverage=self.parameterAsDouble(parameters, MIN_COVERAGE, context),
                max_other_coverage=self.parameterAsDouble(parameters, MAX_OTHER_COVERAGE, context),
                nodata_threshold=self.parameterAsDouble(parameters, NODATA_THRESHOLD, context),
                split_by=self._splits[self.parameterAsEnum(parameters, SPLIT_BY, context)],
                block_size=self.parameterAsDouble(parameters, BLOCK_SIZE, context),
                test_fraction=self.parameterAsDouble(parameters, TEST_FRACTION, context),
                seed=self.parameterAsInt(parameters, SEED, context),
                min_chips=self.parameterAsInt(parameters, MIN_CHIPS, context),
                overwrite=self.parameterAsBoolean(parameters, OVERWRITE, context),
                class_colors=style_colors(self._styled(layer, context), class_field),
            )
            summary = make_chips(rasters, labels, class_field,
                                 self.parameterAsFileOutput(parameters, OUTPUT_FOLDER, context), config,
                                 monitor_for(feedback, name_of))
        feedback.pushInfo(summary.table(name_of))
        self._index = str(summary.index)
        return {OUTPUT_FOLDER: str(summary.out_dir), SPLIT_CSV: str(summary.split_csv), INDEX: self._index,
                CHIP_COUNT: summary.chips}

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 (QGIS's name)
        # On the main thread. QGIS loads the index when run from the dialog, but without the default
        # style the GeoPackage carries (Processing skips it), so it is applied as the classify
        # algorithms' is. LayerDetails through the instance: tests/test_qt6_ready.py reads
        # Class.Upper as an enum.
        if self._index is not None and context.project() is not None:
            context.addLayerToLoadOnCompletion(
                self._index, context.LayerDetails("Training chips", context.project(), INDEX))
            style_when_loaded(context, self._index, stored_style(self._index))
        return {}

    def _labels_file(self, parameters, context, feedback) -> tuple[str, QgsVectorLayer]:
        """The vector file the core reads for the polygon parameter (see the module docstring),
        and the layer it comes from."""
        chosen = parameters.get(LABELS)
        definition = chosen if isinstance(chosen, QgsProcessingFeatureSourceDefinition) else None
        # parameterAsVectorLayer does not look inside a source definition (QGIS 3.22): give it the layer's
        layer = self.parameterAsVectorLayer({LABELS: definition.source} if definition else parameters, LABELS,
                                            context)
        if layer is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, LABELS))
        selected = definition is not None and definition.selectedFeaturesOnly
        limit = definition.featureLimit if definition is not None else -1
        if not selected and limit == -1:
            path = readable_file(layer)
            if path is not None:
                return path, layer
        path = export_labels(layer, selected, limit, context, feedback)
        feedback.pushInfo(f"Labelled polygons: layer '{layer.name()}' written to {path}")
        return path, layer


    @staticmethod
    def _styled(layer: QgsVectorLayer, context) -> QgsVectorLayer:
        """The labels as the analyst styled them: a project layer as it is; a file given by its
        path (batch runs) as QGIS opens it, with the default style saved with the file, which
        Processing's own loading leaves out (QGIS 3.22)."""
        project = context.project()
        if project is not None and project.mapLayer(layer.id()) is not None:
            return layer
        reopened = QgsVectorLayer(layer.source(), layer.name(), layer.providerType())
        return reopened if reopened.isValid() else layer


def style_colors(layer: QgsVectorLayer, class_field: str) -> dict[str, str] | None:
    """The analyst's class colours (class name → ``#rrggbb``): each category's symbol colour when
    ``layer`` is drawn by a categorized renderer on ``class_field``, else ``None``. Only reads the
    renderer, so it is safe off the main thread."""
    from casd_core.chips.labels import class_text  # the core's reading of a class field's value

    renderer = layer.renderer()
    if not isinstance(renderer, QgsCategorizedSymbolRenderer) or renderer.classAttribute() not in (
            class_field, QgsExpression.quotedColumnRef(class_field)):
        return None
    colors: dict[str, str] = {}
    for category in renderer.categories():
        values = category.value() if isinstance(category.value(), list) else [category.value()]  # merged categories
        for value in values:
            name = class_text(value)  # None for the "all other values" category (NULL or "")
            if name is not None and category.symbol() is not None:
                colors.setdefault(name, category.symbol().color().name())
    return colors or None


def readable_file(layer: QgsVectorLayer) -> str | None:
    """The file behind ``layer`` when reading that file's first layer gives exactly the features
    QGIS shows (an OGR file layer, no subset filter, no unsaved edits); else ``None``."""
    with warnings.catch_warnings():  # as casd_core imports it
        warnings.simplefilter("ignore", UserWarning)
        import pyogrio

    if layer.providerType() != "ogr" or layer.subsetString() or layer.isModified():
        return None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    path = parts.get("path") or ""
    if path.startswith("/vsi") or not os.path.exists(path):
        return None
    name, index = parts.get("layerName") or None, parts.get("layerId") or None  # NULL, "" and 0: unset
    if name is not None or index is not None:  # the core reads a file's first layer only
        try:
            first = str(pyogrio.list_layers(path)[0][0])
        except Exception:  # noqa: BLE001 - a file pyogrio cannot list: let QGIS write it out
            return None
        if name not in (None, first) or index is not None:
            return None
    return path


def export_labels(layer: QgsVectorLayer, selected: bool, limit: int, context, feedback) -> str:
    """``layer``'s features (the selected ones only, when ``selected``) as a GeoPackage in
    Processing's temp folder, in the layer's CRS, each with its QGIS feature id as the FID."""
    from casd_core.errors import Cancelled

    kept = [i for i, field in enumerate(layer.fields()) if field.name().lower() != "fid"]
    fields = QgsFields()
    fields.append(QgsField("fid", FIELD_INT64))  # the GeoPackage writer takes a "fid" field as the FID
    for i in kept:
        fields.append(layer.fields().at(i))
    path = QgsProcessingUtils.generateTempFilename(f"{layer.name() or 'labels'}.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.fileEncoding = context.defaultEncoding()
    writer = QgsVectorFileWriter.create(path, fields, layer.wkbType(), layer.crs(), context.transformContext(),
                                        options)
    if writer.hasError():
        raise QgsProcessingException(f"could not write the polygons of '{layer.name()}' to {path}: "
                                     f"{writer.errorMessage()}")
    features = layer.getSelectedFeatures() if selected else layer.getFeatures()
    try:
        for count, feature in enumerate(features):
            if feedback.isCanceled():
                raise Cancelled()
            if limit != -1 and count >= limit:
                break
            copy = QgsFeature(fields)
            copy.setGeometry(feature.geometry())
            attributes = feature.attributes()
            copy.setAttributes([feature.id()] + [attributes[i] for i in kept])
            if not writer.addFeature(copy):
                raise QgsProcessingException(f"could not write feature {feature.id()} of '{layer.name()}' to "
                                             f"{path}: {writer.errorMessage()}")
    finally:
        del writer  # closes the file
    return path


def stored_style(path: str) -> str:
    """The default style a vector file carries (chips.gpkg's: by class), as QML."""
    document = QDomDocument("qgis")
    layer = QgsVectorLayer(path, "chips", "ogr")  # loads the file's default style
    layer.exportNamedStyle(document)
    return document.toString()
