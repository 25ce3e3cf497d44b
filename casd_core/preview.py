"""A quick-look PNG of a labelled grid: the raster in RGB with the class of every tile over it.

It answers "does this look right?" without opening QGIS: the imagery, read decimated to the
picture's size (a few MB for any raster: GDAL reads overviews when there are some, else decodes
each block once, seconds for 20,000²), each tile (or dissolved region) of the layer written by
``casd predict`` filled with its class colour at 45 % opacity, and a legend of the classes
that occur with their tile counts. Tiles without a trusted label (``class_name ==
"uncertain"`` or a null ``class_id``) are drawn grey and hatched, listed last as "uncertain".

Colours are the model package's when it is given, else the map colours of the AID classes,
else a palette colour chosen by a hash of the class name (so a class keeps its colour from
one picture to the next). Drawing uses matplotlib's Agg canvas directly, never ``pyplot``,
so the global backend QGIS has chosen is left alone.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling

from casd_core.atomic import atomic_path
from casd_core.errors import CasdError, param
from casd_core.package import ModelPackage
from casd_core.style import UNCERTAIN, class_color
from casd_core.vectorio import read_layer

FILL_ALPHA = 0.45
_DPI = 100
_FONT = 8  # legend font size, points


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: class name, its colour ("#rrggbb") and how many tiles have it."""

    name: str
    color: str
    count: int


@dataclass(frozen=True)
class Preview:
    """The PNG written (usable wherever a path is) and what its legend shows."""

    path: Path
    legend: tuple[LegendEntry, ...]
    tiles: int  # tiles drawn (a dissolved region counts its ``tile_count``)
    size: tuple[int, int]  # (width, height) of the PNG in pixels

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def render_preview(raster: str | os.PathLike, layer: str | os.PathLike, png: str | os.PathLike,
                   package: ModelPackage | str | os.PathLike | None = None, *,
                   bands: tuple[int, ...] | None = None, max_size: int = 1600,
                   title: str | None = None) -> Preview:
    """Draw ``layer`` (a tile or dissolved layer from ``casd predict``) over ``raster`` into
    ``png`` (written atomically; its longest side is about ``max_size`` pixels).

    ``bands``: 1-based raster bands shown as RGB (one band: grey); default the first three.
    """
    with warnings.catch_warnings():
        # Next to QGIS, Debian's mpl_toolkits shadows pip's and matplotlib warns that 3-D axes
        # are unavailable; none is drawn here.
        warnings.filterwarnings("ignore", message="Unable to import Axes3D")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

    if isinstance(package, (str, os.PathLike)):
        package = ModelPackage.load(package)
    raster, png = Path(raster), Path(png)
    if max_size < 200:
        raise CasdError(f"max_size {max_size} is too small for a readable picture; use 200 or more")
    with rasterio.open(raster) as src:
        bounds, crs, south_up = src.bounds, src.crs, src.transform.e > 0
        features = _read_features(layer, crs)
        legend = _legend(features, package)
        handles = [Patch(facecolor=_rgb(e.color) + (FILL_ALPHA + 0.2,), edgecolor=e.color,
                         hatch="///" if e.name == UNCERTAIN else None,
                         label=f"{e.name} ({e.count})") for e in legend]
        style = dict(handles=handles, loc="upper left", frameon=False, fontsize=_FONT,
                     title="class (tiles)", title_fontsize=_FONT, alignment="left")
        probe = Figure(dpi=_DPI)  # measure the legend to leave it room
        extent = probe.legend(**style).get_window_extent(FigureCanvasAgg(probe).get_renderer())
        legend_w, legend_h = int(extent.width) + 1, int(extent.height) + 1
        left, right, bottom, top = 70, legend_w + 20, 35, 40
        aspect = (bounds.right - bounds.left) / (bounds.top - bounds.bottom)
        map_w = min(max_size - left - right, (max_size - top - bottom) * aspect)
        map_w, map_h = max(int(map_w), 50), max(int(map_w / aspect), 50)
        rgba = _read_rgba(src, bands, map_w, map_h)
    width, height = map_w + left + right, max(map_h + top + bottom, legend_h + top)

    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, (height - top - map_h) / height, map_w / width, map_h / height))
    ax.imshow(rgba, extent=(bounds.left, bounds.right, bounds.bottom, bounds.top),
              origin="lower" if south_up else "upper", interpolation="antialiased")
    sample = shapely.bounds(features["geometry"][:200])  # thin lines, or none, for small tiles
    tile_px = np.nanmedian(sample[:, 2] - sample[:, 0]) * map_w / (bounds.right - bounds.left)
    line = 0.0 if tile_px < 6 else (0.3 if tile_px < 20 else 0.7)
    _draw_features(ax, features, package, line)
    ax.set_xlim(bounds.left, bounds.right)
    ax.set_ylim(bounds.bottom, bounds.top)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6, length=2, pad=1)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.set_title(title or _title(raster, features), fontsize=9, loc="left")
    fig.legend(**style, bbox_to_anchor=((left + map_w + 10) / width, 1 - top / height))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    tiles = int(sum(e.count for e in legend))
    return Preview(path=png, legend=tuple(legend), tiles=tiles, size=(int(width), int(height)))


def _read_rgba(src: Any, bands: tuple[int, ...] | None, map_w: int, map_h: int) -> np.ndarray:
    """The raster decimated to at most the map's size, stretched 2–98 % per band for display
    only; masked (nodata) pixels are transparent."""
    bands = tuple(bands) if bands else ((1, 2, 3) if src.count >= 3 else (1,))
    if len(bands) not in (1, 3) or any(int(b) != b or not 1 <= b <= src.count for b in bands):
        raise CasdError(f"{param('bands')} {bands} must be one or three of the raster's band "
                        f"numbers 1..{src.count}, e.g. 1,2,3")
    scale = min(1.0, max(map_w / src.width, map_h / src.height))
    shape = (len(bands), max(1, round(src.height * scale)), max(1, round(src.width * scale)))
    data = src.read(list(bands), out_shape=shape, masked=True, resampling=Resampling.average)
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    rgba = np.zeros(shape[1:] + (4,), dtype=np.float32)
    for i in range(3):  # one band: grey
        band = np.asarray(data[min(i, len(bands) - 1)].data, dtype=np.float32)
        lo, hi = np.percentile(band[valid], (2, 98)) if valid.any() else (0.0, 1.0)
        rgba[..., i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgba[..., 3] = valid
    return rgba


def _read_features(layer: str | os.PathLike, crs: Any) -> dict[str, Any]:
    """Geometries (in the raster's CRS), class names (uncertain ones marked) and tile counts
    of the casd layer in ``layer`` (its stem's layer, else its first)."""
    wkb, data, layer_crs = read_layer(layer, ["class_name"], optional=("class_id", "tile_count", "model"))
    geometry = shapely.from_wkb(wkb)
    if layer_crs and crs is not None:
        from rasterio.crs import CRS
        from rasterio.warp import transform as warp

        source = CRS.from_user_input(layer_crs)
        if source != crs:
            geometry = shapely.transform(geometry, lambda xy: np.column_stack(
                warp(source, crs, xy[:, 0], xy[:, 1])))
    labels = np.array([n if isinstance(n, str) and n else UNCERTAIN for n in data["class_name"]],
                      dtype=object)
    if "class_id" in data:  # a null id (read as NaN) is an abstention
        labels[~np.isfinite(np.asarray(data["class_id"], dtype=float))] = UNCERTAIN
    counts = np.asarray(data.get("tile_count", np.ones(len(labels))), dtype=np.int64)
    models = sorted({m for m in data.get("model", []) if isinstance(m, str) and m})
    return {"geometry": geometry, "names": labels, "counts": counts, "models": models,
            "dissolved": "tile_count" in data}


def _legend(features: dict[str, Any], package: ModelPackage | None) -> list[LegendEntry]:
    totals: dict[str, int] = {}
    for name, count in zip(features["names"], features["counts"]):
        totals[name] = totals.get(name, 0) + int(count)
    if not totals:
        raise CasdError("the layer has no feature to draw")
    order = sorted(totals, key=lambda n: (n == UNCERTAIN, -totals[n], n))  # uncertain last
    return [LegendEntry(n, class_color(n, package), totals[n]) for n in order]


def _draw_features(ax: Any, features: dict[str, Any], package: ModelPackage | None,
                   line: float) -> None:
    from matplotlib.collections import PathCollection

    names = features["names"]
    paths = _paths(features["geometry"])
    for uncertain in (False, True):
        keep = np.flatnonzero((names == UNCERTAIN) == uncertain)
        if len(keep) == 0:
            continue
        colors = [_rgb(class_color(names[i], package)) for i in keep]
        collection = PathCollection([paths[i] for i in keep], zorder=2,
                                    facecolors=[c + (FILL_ALPHA,) for c in colors],
                                    edgecolors=[c + (0.9,) for c in colors], linewidths=line,
                                    hatch="///" if uncertain else None)
        collection.set_transform(ax.transData)
        ax.add_collection(collection)


def _paths(geometry: np.ndarray) -> list[Any]:
    """One matplotlib path per (multi)polygon, holes included, built with array operations
    (100,000 tiles in about a second). Agg fills by the non-zero rule, so each shell is made
    counter-clockwise and each hole clockwise."""
    from matplotlib.path import Path as MplPath

    empty = MplPath(np.zeros((1, 2)), [MplPath.MOVETO])
    polygons, owner = shapely.get_parts(geometry, return_index=True)
    rings, ring_polygon = shapely.get_rings(polygons, return_index=True)  # shell first
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    if len(xy) == 0:
        return [empty] * len(geometry)
    starts = np.searchsorted(ring_of, np.arange(len(rings)))
    ends = np.append(starts[1:], len(xy))
    cross = np.append(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1], 0.0)
    cross[ends - 1] = 0.0  # no segment joins one ring to the next
    shell = np.r_[True, ring_polygon[1:] != ring_polygon[:-1]]
    flip = (np.add.reduceat(cross, starts) > 0) != shell
    index = np.arange(len(xy))
    turn = flip[ring_of]
    index[turn] = (starts[ring_of] + ends[ring_of] - 1 - index)[turn]
    xy = xy[index]
    codes = np.full(len(xy), MplPath.LINETO, dtype=MplPath.code_type)
    codes[starts], codes[ends - 1] = MplPath.MOVETO, MplPath.CLOSEPOLY
    vertex_feature = owner[ring_polygon][ring_of]
    bounds = np.searchsorted(vertex_feature, np.arange(len(geometry) + 1))
    return [MplPath(xy[a:b], codes[a:b]) if b > a else empty for a, b in zip(bounds[:-1], bounds[1:])]


def _title(raster: Path, features: dict[str, Any]) -> str:
    tiles = int(features["counts"].sum())
    what = (f"{tiles} tiles in {len(features['names'])} regions" if features["dissolved"]
            else f"{tiles} tiles")
    return " · ".join([raster.name, *features["models"][:2], what])


def _rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    try:
        return to_rgb(color)
    except ValueError:
        return (0.5, 0.5, 0.5)
