"""The tiling and inference parameters that classifyraster and classifyfolder share.

Their defaults are the core's (``TilingConfig``, ``InferenceConfig``): one place for each.
"""

from __future__ import annotations

from qgis.core import QgsProcessingParameterEnum, QgsProcessingParameterNumber

from .common import advanced
from .value_params import label_settings

TILE_SIZE = "TILE_SIZE"
TILE_UNIT = "TILE_UNIT"
OVERLAP = "OVERLAP"
STRIDE = "STRIDE"
NODATA_THRESHOLD = "NODATA_THRESHOLD"
BATCH_SIZE = "BATCH_SIZE"

TILE_UNITS = (("m", "metres (map units)"), ("px", "pixels"))

# The core's settings whose parameter is not simply the key in upper case (for user_errors).
TILING_PARAMETERS = {"unit": TILE_UNIT}

HELP = (
    "<b>Tile size</b>: the side of one square tile, in metres or pixels; empty uses the model's "
    "recommended ground footprint, so tiles show the same amount of ground as the training images. "
    "<b>Overlap</b>: fraction of a tile shared with its neighbour (0 = side by side); an explicit "
    "<b>stride</b> (same unit as the tile size) overrides it. <b>Nodata threshold</b>: tiles with a "
    "larger fraction of nodata pixels are skipped and get no feature. Each tile is resampled to the "
    "model's input size."
)


def _decimals(param, decimals: int):
    param.setMetadata({"widget_wrapper": {"decimals": decimals}})
    return param


def tile_size_parameter(label: str = "Tile size (empty: the model's recommended footprint)"):
    return _decimals(QgsProcessingParameterNumber(
        TILE_SIZE, label, type=QgsProcessingParameterNumber.Type.Double, minValue=0.0, optional=True), 1)


def tile_unit_parameter(default_unit: str):
    return QgsProcessingParameterEnum(TILE_UNIT, "Tile size unit", options=[label for _, label in TILE_UNITS],
                                      defaultValue=[unit for unit, _ in TILE_UNITS].index(default_unit))


def stride_parameter(label: str = "Stride (in the tile size unit; empty: from the overlap)"):
    return _decimals(QgsProcessingParameterNumber(
        STRIDE, label, type=QgsProcessingParameterNumber.Type.Double, minValue=0.0, optional=True), 1)


def fraction_parameter(name: str, label: str, default: float, maximum: float = 1.0):
    """A share in [0, ``maximum``], shown with two decimals."""
    return _decimals(QgsProcessingParameterNumber(
        name, label, type=QgsProcessingParameterNumber.Type.Double, minValue=0.0, maxValue=maximum,
        defaultValue=default), 2)


def add_tiling_parameters(algorithm) -> None:
    from casd_core.inference import InferenceConfig
    from casd_core.tiling import TilingConfig

    algorithm.addParameter(tile_size_parameter())
    algorithm.addParameter(tile_unit_parameter(TilingConfig.unit))
    algorithm.addParameter(fraction_parameter(
        OVERLAP, "Overlap between neighbouring tiles (fraction of a tile)", TilingConfig.overlap, 0.95))
    algorithm.addParameter(advanced(stride_parameter()))
    algorithm.addParameter(fraction_parameter(
        NODATA_THRESHOLD, "Nodata threshold (skip tiles with more than this fraction of nodata pixels)",
        TilingConfig.nodata_threshold))
    algorithm.addParameter(advanced(QgsProcessingParameterNumber(
        BATCH_SIZE, "Batch size (tiles per forward pass)", type=QgsProcessingParameterNumber.Type.Integer,
        defaultValue=InferenceConfig.batch_size, minValue=1)))


def tiling_config(algorithm, parameters: dict, context, bands=None, extent=None):
    """The core's :class:`TilingConfig` from the shared parameters."""
    from casd_core.tiling import TilingConfig

    return TilingConfig(
        tile_size=algorithm.parameterAsDouble(parameters, TILE_SIZE, context) or None,
        unit=TILE_UNITS[algorithm.parameterAsEnum(parameters, TILE_UNIT, context)][0],
        overlap=algorithm.parameterAsDouble(parameters, OVERLAP, context),
        stride=algorithm.parameterAsDouble(parameters, STRIDE, context) or None,
        nodata_threshold=algorithm.parameterAsDouble(parameters, NODATA_THRESHOLD, context),
        bands=tuple(bands) if bands else None,
        extent=extent,
    )


def inference_config(algorithm, parameters: dict, context, device: str):
    """The core's :class:`InferenceConfig`: batch size and device here, labels from value_params."""
    from casd_core.inference import InferenceConfig

    return InferenceConfig(batch_size=algorithm.parameterAsInt(parameters, BATCH_SIZE, context), device=device,
                           **label_settings(algorithm, parameters, context))
