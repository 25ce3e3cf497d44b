"""``casd:classifyraster`` — label every tile of a raster layer with its scene class.

The same core generator as ``casd predict`` (``iter_tile_predictions``) yields the tiles; this
face only turns them into features of a Processing sink, so the output can be any format QGIS
writes, a temporary layer, or a model's intermediate result. The optional preview PNG and class
raster are the core's too (``grid_outputs.py``).
"""

from __future__ import annotations

import os
from collections import Counter

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsGeometry, QgsProcessing,
                       QgsProcessingException, QgsProcessingOutputNumber, QgsProcessingParameterBand,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterRasterLayer, QgsProviderRegistry, QgsRasterLayer, QgsWkbTypes)
from ..compat import FIELD_DOUBLE, FIELD_INT, FIELD_INT64, FIELD_STRING
from ..feedback import monitor_for
from ..styling import style_when_loaded
from .common import CasdAlgorithm, dialog_names, user_errors
from .grid_outputs import HELP as OUTPUTS_HELP
from .grid_outputs import PREVIEW, RASTER_OUT, add_grid_outputs, requested, write_grid_outputs  # noqa: F401
from .tiling_params import (BATCH_SIZE, HELP, NODATA_THRESHOLD, OVERLAP, STRIDE, TILE_SIZE, TILE_UNIT,  # noqa: F401
                            TILING_PARAMETERS, add_tiling_parameters, inference_config, tiling_config)
from .value_params import HELP as VALUES_HELP
from .value_params import (AUTO_NODATA, MIN_SCORE, NODATA, PERCENTILES, SMOOTH, STRETCH, TTA,  # noqa: F401
                           VALUE_RANGE, add_value_parameters, radiometry_config)

INPUT = "INPUT"
MODEL = "MODEL"
BANDS = "BANDS"
EXTENT = "EXTENT"
DEVICE = "DEVICE"
OUTPUT = "OUTPUT"
TILE_COUNT = "TILE_COUNT"

_FIELD_TYPES = {"int32": FIELD_INT, "int64": FIELD_INT64, "float64": FIELD_DOUBLE, "float32": FIELD_DOUBLE,
                "str": FIELD_STRING}
# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {**TILING_PARAMETERS, "raster": INPUT}


def output_fields() -> QgsFields:
    """The sink's fields, from the core's ``OUTPUT_FIELDS`` (the same columns the CLI writes)."""
    from casd_core.vectorio import OUTPUT_FIELDS

    fields = QgsFields()
    for name, kind in OUTPUT_FIELDS:
        fields.append(QgsField(name, _FIELD_TYPES[kind]))
    return fields


def raster_file(layer: QgsRasterLayer) -> str:
    """The file (or GDAL dataset name) behind ``layer``; casd_core reads rasters with rasterio."""
    from casd_core.errors import CasdError, param

    if layer.providerType() != "gdal":
        raise CasdError(f"layer '{layer.name()}' is not a raster file ({layer.providerType()} provider); "
                        "save it as a GeoTIFF first (Raster ▸ Conversion ▸ Translate) and choose that as "
                        f"the {param('raster')}")
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if parts.get("layerName"):
        return layer.source()  # e.g. a GeoPackage raster table: GDAL's own dataset name
    if not (os.path.isfile(path) or path.startswith("/vsi")):
        raise CasdError(f"the file behind layer '{layer.name()}' ({path}) cannot be found; save the layer "
                        f"as a GeoTIFF first and choose that as the {param('raster')}")
    return path


def log_stream(feedback, stream, values: dict[str, str]) -> None:
    """What one raster's run did: tiles, labels, the nodata and uncertain shares, the values applied."""
    nodata = stream.skipped_nodata / stream.total if stream.total else 0.0
    uncertain = stream.uncertain / stream.labelled if stream.labelled else 0.0
    feedback.pushInfo(f"{stream.labelled} of {stream.total} tiles labelled, {stream.skipped_nodata} skipped "
                      f"as nodata ({nodata:.0%}), {stream.uncertain} uncertain ({uncertain:.0%})")
    feedback.pushInfo(f"Values: {values['casd_stretch']}; padding: {values['casd_padding']}")


def _plain(value):
    """numpy scalars as Python values, which QVariant accepts."""
    return value.item() if hasattr(value, "item") else value


class ClassifyRasterAlgorithm(CasdAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self._style: tuple[str, str] | None = None  # (output layer id, QML) for postProcessAlgorithm

    def name(self) -> str:
        return "classifyraster"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Classify raster scenes"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Cuts a raster into square tiles and labels each tile with its scene class (e.g. Forest, "
            "River, Industrial, DenseResidential). The output has one polygon per tile with the "
            "predicted class, its probability and the runner-up classes; it is added to the map "
            "categorised by class in the model's colours.<br><br>"
            "<b>Model</b>: a model package (<i>.safetensors</i>) written by 'Train a scene "
            "classifier'; empty uses the embedded model trained on the 30 AID classes. "
            "<b>Bands</b>: the raster bands fed to the model, in the model's band order (red, green, "
            "blue for the default model); empty takes the first bands.<br><br>"
            f"{HELP}<br><br>{VALUES_HELP}<br><br>"
            "<b>Extent</b> (optional) limits the classification to an area. The raster must be a "
            f"file GDAL reads (e.g. GeoTIFF).<br><br>{OUTPUTS_HELP} The log gives the tiles "
            "labelled, the shares skipped as nodata and uncertain, the value mapping and the padding "
            "found. Cancel stops between batches and writes nothing."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, "Raster layer"))
        self.add_model_parameter(MODEL)
        self.addParameter(QgsProcessingParameterBand(
            BANDS, "Bands (empty: the first bands, as many as the model needs)",
            parentLayerParameterName=INPUT, optional=True, allowMultiple=True))
        add_tiling_parameters(self)
        add_value_parameters(self)
        self.add_device_parameter(DEVICE)
        self.addParameter(QgsProcessingParameterExtent(EXTENT, "Extent (empty: the whole raster)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink(
            OUTPUT, "Scene classes", type=QgsProcessing.SourceType.TypeVectorPolygon))
        add_grid_outputs(self)
        self.addOutput(QgsProcessingOutputNumber(TILE_COUNT, "Number of labelled tiles"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        raster = self.parameterAsRasterLayer(parameters, INPUT, context)
        extent = self.parameterAsExtent(parameters, EXTENT, context, raster.crs())
        with user_errors(self, PARAMETERS):
            from casd_core.inference import Predictor, iter_tile_predictions
            from casd_core.inference.classify import describe_values
            from casd_core.vectorio import qml_style

            source = raster_file(raster)
            device = self.device(parameters, DEVICE, context)
            predictor = Predictor.from_package(self.model_path(parameters, MODEL, context), device)
            package = predictor.package
            tiling = tiling_config(
                self, parameters, context, bands=self.parameterAsInts(parameters, BANDS, context),
                extent=None if extent.isNull() else (extent.xMinimum(), extent.yMinimum(),
                                                     extent.xMaximum(), extent.yMaximum()))
            fields = output_fields()
            inference = inference_config(self, parameters, context, device)
            preview, raster_out = requested(self, parameters, context, inference.smooth)
            stream = iter_tile_predictions(source, predictor, tiling, inference,
                                           monitor_for(feedback, dialog_names(self, PARAMETERS)),
                                           radiometry_config(self, parameters, context))
            # Features are kept until the end and the sink is opened only then: the sink creates
            # its file when opened, and a cancel must leave no output behind.
            features, predictions = [], []
            try:
                for prediction in stream:
                    features.append(self._feature(prediction, fields))
                    if preview or raster_out:
                        predictions.append(prediction)
            finally:
                stream.close()
        sink, dest_id = self.parameterAsSink(parameters, OUTPUT, context, fields, QgsWkbTypes.Type.Polygon,
                                              raster.crs())
        if not sink.addFeatures(features, QgsFeatureSink.Flag.FastInsert):
            raise QgsProcessingException(f"could not write the tiles: {sink.lastError()}")
        log_stream(feedback, stream, describe_values(stream.plan))
        counts = Counter(feature["class_name"] for feature in features)
        feedback.pushInfo("Classes: " + ", ".join(f"{name} {count}" for name, count in counts.most_common()))
        self._style = (dest_id, qml_style(package))
        with user_errors(self, PARAMETERS):
            written = write_grid_outputs(predictions, stream.plan, package, preview, raster_out)
        for path in written.values():
            feedback.pushInfo(f"Wrote {path}")
        return {OUTPUT: dest_id, TILE_COUNT: len(features), **written}

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 (QGIS's name)
        if self._style is not None:  # runs on the main thread, before QGIS loads the layer
            style_when_loaded(context, *self._style)
        return {}

    @staticmethod
    def _feature(prediction, fields: QgsFields) -> QgsFeature:
        feature = QgsFeature(fields)
        geometry = QgsGeometry()
        geometry.fromWkb(prediction.geometry.wkb)
        feature.setGeometry(geometry)
        feature.setAttributes([_plain(getattr(prediction, field.name())) for field in fields])
        return feature

