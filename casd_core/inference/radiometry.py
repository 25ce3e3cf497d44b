"""How raw raster values become the model's input: one linear mapping per raster, chosen once
from a decimated read, never per tile.

The model learnt from pixels with certain statistics (``ModelPackage.pixel_stats``, raw units:
the AID model saw 8-bit JPEGs whose 0.5/99.5 % percentiles are about 7 and 253). A raster
whose values fit those (an 8-bit orthophoto) is fed as it is: contrast moves labels (a 2–98 %
stretch of the 8-bit ``test_tiled.tif`` changes 11 of its 25 labels), so the default touches
nothing that fits. A raster that does not fit (12/16-bit counts, 0–1 reflectance, a very dark
8-bit image: its 99.5 % percentile, averaged over the bands, is outside 0.5–2× the training
pixels') is mapped as gently as possible: one gain for all bands, no offset, so that the
raster's 99.5 % percentile lands on the training pixels'. Zero stays zero and the colour
balance is kept, so a pure scaling of an image (×40, /255) is undone exactly up to the image's
own brightness relative to the training set (``test_tiled.tif`` ×40 comes back as the original
×1.03; its labels do not change). Rasters with negative values get a gain and offset instead
(their 0.5/99.5 % percentiles onto the training pixels'). After mapping, values are clipped to
the model's range ``[0, value_scale]``, as an 8-bit sensor saturates.

Explicit choices: ``stretch="none"`` (raw), ``"percentile"`` (QGIS's cumulative count cut,
2–98 % per band by default, onto ``[0, value_scale]``), ``"minmax"`` (per band) and
``value_range`` (given per band or for all bands; wins over ``stretch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from casd_core.errors import CasdError, param
from casd_core.package import ModelPackage

STRETCHES = ("auto", "none", "percentile", "minmax")
# Pixels (per band) read to decide the mapping: enough for stable percentiles, cheap on huge rasters.
SAMPLE_PIXELS = 1 << 20
_AUTO_PERCENTILES = (0.5, 99.5)
_FIT_RATIO = (0.5, 2.0)


@dataclass
class RadiometryConfig:
    """How raw values are mapped and which pixels are nodata (see the module doc).

    ``stretch``: "auto", "none", "percentile" or "minmax"; ``percentiles`` is the cut of
    "percentile". ``value_range`` = (mins, maxs), one value or one per band, mapped linearly
    onto the model's value range. ``nodata``: a value that marks nodata in every band,
    overriding the raster's own flag. ``auto_nodata``: where the raster has no nodata flag,
    constant 0 or 255 regions (all bands) connected to its border count as nodata.
    """

    stretch: str = "auto"
    percentiles: tuple[float, float] = (2.0, 98.0)
    value_range: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    nodata: float | None = None
    auto_nodata: bool = True

    def validate(self) -> None:
        if self.stretch not in STRETCHES:
            raise CasdError(f"{param('stretch')} {self.stretch!r} is not one of {', '.join(STRETCHES)}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise CasdError(f"{param('percentiles')} {low:g}–{high:g} must satisfy 0 <= low < high <= 100, "
                            "e.g. 2 98")
        if self.value_range is not None:
            mins, maxs = self.value_range
            if len(mins) != len(maxs) or not mins or any(not lo < hi for lo, hi in zip(mins, maxs)):
                raise CasdError(f"{param('value_range')} needs as many minimums as maximums, each "
                                "minimum below its maximum, e.g. 0 4095 or 0,0,0 3000,3200,2800")
        if self.nodata is not None and not (math.isfinite(self.nodata) or math.isnan(self.nodata)):
            raise CasdError(f"{param('nodata')} {self.nodata} must be a number")


def parse_value_range(text_min: str, text_max: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``("0", "4095")`` or ``("0,0,0", "3000,3200,2800")`` as a :attr:`RadiometryConfig.value_range`
    (one value for all bands, or one per band); how the counts match is checked by ``validate``."""
    try:
        mins, maxs = (tuple(float(v) for v in text.split(",")) for text in (text_min, text_max))
    except ValueError:
        raise CasdError(f"{param('value_range')} {text_min} {text_max} must be numbers, e.g. "
                        "0 4095 or 0,0,0 3000,3200,2800") from None
    return mins, maxs


@dataclass(frozen=True)
class ValueMapping:
    """raw → clip(gain · raw + offset, 0, upper), per band; ``description`` says which and why."""

    gain: np.ndarray
    offset: np.ndarray
    upper: float
    description: str

    def apply(self, raw: np.ndarray, band_axis: int) -> np.ndarray:
        shape = [1] * raw.ndim
        shape[band_axis] = -1
        mapped = raw.astype(np.float32) * self.gain.reshape(shape) + self.offset.reshape(shape)
        return np.clip(mapped, 0.0, self.upper, out=mapped)

    def inverse(self, value: np.ndarray) -> np.ndarray:
        """The raw values that map onto ``value`` (per band): where nodata pixels are filled."""
        return (np.asarray(value, dtype=np.float64) - self.offset) / self.gain


def _training_range(package: ModelPackage) -> tuple[float, float]:
    """The training pixels' 0.5/99.5 % percentiles averaged over bands (raw units); packages
    without statistics are taken to span their value range."""
    stats = package.pixel_stats
    if stats and stats.get("low") and stats.get("high"):
        return float(np.mean(stats["low"])), float(np.mean(stats["high"]))
    return 0.0, float(package.value_scale)


def choose_mapping(sample: np.ndarray, package: ModelPackage,
                   config: RadiometryConfig) -> ValueMapping | None:
    """The mapping for a raster whose valid pixels are ``sample`` (bands, N); ``None`` = raw."""
    bands, upper = sample.shape[0], float(package.value_scale)
    if config.value_range is not None:
        mins, maxs = (np.broadcast_to(np.asarray(v, dtype=np.float64), (bands,)).copy()
                      if len(v) in (1, bands) else None for v in config.value_range)
        if mins is None or maxs is None:
            raise CasdError(f"{param('value_range')} gives {len(config.value_range[0])} values but "
                            f"{bands} bands are read; give one value or one per band")
        return _linear(mins, maxs, upper, f"value range {_fmt(mins)}–{_fmt(maxs)} → 0–{upper:g}")
    if config.stretch == "none" or sample.size == 0:
        return None
    if config.stretch == "percentile":
        low, high = config.percentiles
        lows, highs = np.percentile(sample, low, axis=1), np.percentile(sample, high, axis=1)
        return _linear(lows, highs, upper, f"percentile stretch {low:g}–{high:g} % per band")
    if config.stretch == "minmax":
        return _linear(sample.min(axis=1), sample.max(axis=1), upper, "min–max stretch per band")
    raster_low, raster_high = (float(v) for v in np.percentile(sample, _AUTO_PERCENTILES, axis=1).mean(axis=1))
    train_low, train_high = _training_range(package)
    ratio = raster_high / train_high if train_high > 0 else math.inf
    if _FIT_RATIO[0] <= ratio <= _FIT_RATIO[1] and raster_low >= -0.01 * upper:
        return None
    if raster_low >= 0 and raster_high > 0:
        gain = train_high / raster_high
        return ValueMapping(np.full(bands, gain), np.zeros(bands), upper,
                            f"auto: values × {gain:.4g} (the raster's 99.5 % level {raster_high:g} → "
                            f"the training pixels' {train_high:g})")
    if raster_high <= raster_low:
        return None  # a constant raster: nothing to map it by
    gain = (train_high - train_low) / (raster_high - raster_low)
    return ValueMapping(np.full(bands, gain), np.full(bands, train_low - gain * raster_low), upper,
                        f"auto: {raster_low:g}–{raster_high:g} → {train_low:g}–{train_high:g} "
                        "(0.5–99.5 % levels of the raster onto the training pixels')")


def _linear(lows: np.ndarray, highs: np.ndarray, upper: float, description: str) -> ValueMapping:
    span = np.where(highs > lows, highs - lows, 1.0)
    gain = upper / span
    return ValueMapping(gain, -lows * gain, upper, description)


def _fmt(values: np.ndarray) -> str:
    return ",".join(f"{v:g}" for v in values) if len(set(values.tolist())) > 1 else f"{values[0]:g}"
