"""The pixel-value and label parameters that classifyraster and classifyfolder share: how raw
values become the model's input (``RadiometryConfig``) and which labels are trusted
(``InferenceConfig.min_score``, ``tta``, ``smooth``).

Each parameter is named after its core key in upper case (``STRETCH`` sets ``stretch``), so
errors and warnings that name a setting by key (:func:`casd_core.errors.param`) come out as the
parameter's label without a mapping. Defaults are the core dataclasses'.
"""

from __future__ import annotations

import re

from qgis.core import (QgsProcessingParameterBoolean, QgsProcessingParameterEnum, QgsProcessingParameterNumber,
                       QgsProcessingParameterString)

from .common import advanced

STRETCH = "STRETCH"
PERCENTILES = "PERCENTILES"
VALUE_RANGE = "VALUE_RANGE"
NODATA = "NODATA"
AUTO_NODATA = "AUTO_NODATA"
MIN_SCORE = "MIN_SCORE"
TTA = "TTA"
SMOOTH = "SMOOTH"

# The dialog's words for the core's stretches (casd_core.inference.radiometry.STRETCHES), by key.
STRETCH_LABELS = {
    "auto": "auto: raw where the values fit the model, else scaled by one gain",
    "none": "none: raw values",
    "percentile": "percentile: per band, the percentile cut below",
    "minmax": "minmax: per band, minimum to maximum",
}

HELP = (
    "<b>Value stretch</b>: how the raster's values become the model's input. <i>auto</i> feeds "
    "values that fit the model's training pixels as they are (an 8-bit orthophoto) and maps others "
    "(12/16-bit counts, 0–1 reflectance, a very dark image) with one gain for all bands, so that a "
    "scaled copy labels like the original; the log says which mapping was applied. <i>percentile</i> "
    "and <i>minmax</i> stretch each band; a <b>value range</b> (e.g. <i>0 4095</i>, or one value per "
    "band: <i>0,0,0 3000,3200,2800</i>) is mapped linearly and overrides the stretch. "
    "<b>Nodata value</b> overrides the raster's own nodata flag; without a flag, constant 0 or 255 "
    "borders (padding) are detected and treated as nodata unless unchecked.<br><br>"
    "<b>Minimum score</b>: tiles whose calibrated top probability is lower get no class: they are "
    "labelled <i>uncertain</i> with an empty class_id. <b>Test-time augmentation</b> averages the 8 "
    "flips and rotations of each tile (8x slower). <b>Smooth</b> averages overlapping tiles onto the "
    "cells their edges make, so it needs an overlap above 0."
)


def add_value_parameters(algorithm) -> None:
    from casd_core.inference import InferenceConfig, RadiometryConfig
    from casd_core.inference.radiometry import STRETCHES

    double = QgsProcessingParameterNumber.Type.Double
    low, high = RadiometryConfig.percentiles
    algorithm.addParameter(QgsProcessingParameterEnum(
        STRETCH, "Value stretch (how raster values become the model's input)",
        options=[STRETCH_LABELS[key] for key in STRETCHES], defaultValue=STRETCHES.index(RadiometryConfig.stretch)))
    algorithm.addParameter(advanced(QgsProcessingParameterString(
        PERCENTILES, "Percentiles (low,high in %, for the percentile stretch)",
        defaultValue=f"{low:g},{high:g}", optional=True)))
    algorithm.addParameter(advanced(QgsProcessingParameterString(
        VALUE_RANGE, "Value range (min max mapped onto the model's range, e.g. 0 4095 or 0,0,0 3000,3200,2800; "
                     "overrides the stretch)", optional=True)))
    algorithm.addParameter(QgsProcessingParameterNumber(
        NODATA, "Nodata value (in every band; empty: the raster's own nodata flag)", type=double, optional=True))
    algorithm.addParameter(advanced(QgsProcessingParameterBoolean(
        AUTO_NODATA, "Detect border padding as nodata (without a nodata flag: constant 0 or 255 at the edges)",
        defaultValue=RadiometryConfig.auto_nodata)))
    algorithm.addParameter(QgsProcessingParameterNumber(
        MIN_SCORE, "Minimum score (less sure tiles are labelled uncertain; empty: every tile gets a class)",
        type=double, minValue=0.0, maxValue=1.0, optional=True, defaultValue=InferenceConfig.min_score))
    algorithm.addParameter(advanced(QgsProcessingParameterBoolean(
        TTA, "Test-time augmentation (average the 8 flips and rotations of each tile; 8x slower)",
        defaultValue=InferenceConfig.tta)))
    algorithm.addParameter(QgsProcessingParameterBoolean(
        SMOOTH, "Smooth overlapping tiles onto cells (needs an overlap)", defaultValue=InferenceConfig.smooth))


def radiometry_config(algorithm, parameters: dict, context):
    """The core's :class:`RadiometryConfig` from the parameters, validated."""
    from casd_core.inference import RadiometryConfig
    from casd_core.inference.radiometry import STRETCHES

    config = RadiometryConfig(
        stretch=STRETCHES[algorithm.parameterAsEnum(parameters, STRETCH, context)],
        percentiles=_percentiles(algorithm.parameterAsString(parameters, PERCENTILES, context) or ""),
        value_range=_value_range(algorithm.parameterAsString(parameters, VALUE_RANGE, context) or ""),
        nodata=_optional_number(algorithm, parameters, NODATA, context),
        auto_nodata=algorithm.parameterAsBoolean(parameters, AUTO_NODATA, context))
    config.validate()  # once, before any raster (a folder would otherwise fail each raster alike)
    return config


def label_settings(algorithm, parameters: dict, context) -> dict:
    """The label fields of the core's :class:`InferenceConfig` (``min_score``, ``tta``, ``smooth``)."""
    return {"min_score": _optional_number(algorithm, parameters, MIN_SCORE, context),
            "tta": algorithm.parameterAsBoolean(parameters, TTA, context),
            "smooth": algorithm.parameterAsBoolean(parameters, SMOOTH, context)}


def _optional_number(algorithm, parameters: dict, name: str, context) -> float | None:
    """An optional number, ``None`` when left empty (``parameterAsDouble`` would say 0, a real nodata value)."""
    value = parameters.get(name)
    if value is None or value == "":
        return None
    return algorithm.parameterAsDouble(parameters, name, context)


def _percentiles(text: str) -> tuple[float, float]:
    """``"2,98"`` (or ``"2 98"``) → (2.0, 98.0); empty → the core's default cut."""
    from casd_core.errors import CasdError, param
    from casd_core.inference import RadiometryConfig

    parts = [part for part in re.split(r"[\s,;]+", text.strip()) if part]
    if not parts:
        return RadiometryConfig.percentiles
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise CasdError(f"{param('percentiles')} {text.strip()!r} must be two numbers, the low and the high "
                        "percentile, e.g. 2,98") from None
    return low, high


def _value_range(text: str):
    """``"0 4095"`` or ``"0,0,0 3000,3200,2800"`` → the core's value range; empty → None."""
    from casd_core.errors import CasdError, param
    from casd_core.inference.radiometry import parse_value_range

    text = re.sub(r"\s*,\s*", ",", text.strip())  # "0, 0, 0" is one list of minimums
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2:
        raise CasdError(f"{param('value_range')} {text!r} must be a minimum and a maximum separated by a "
                        "space, e.g. 0 4095 or 0,0,0 3000,3200,2800")
    return parse_value_range(*parts)
