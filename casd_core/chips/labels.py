"""The labelled polygons: read from any vector file GDAL reads, reprojected to each raster's
CRS, and their class names turned into safe folder names; each class's colour from a field."""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from casd_core.errors import CasdError, param
from casd_core.style import normalized_color

_POLYGONAL = ("Polygon", "MultiPolygon")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


@dataclass
class Labels:
    """Polygons with a class each, in their file's CRS (``crs``: WKT, ``None`` when unknown).

    ``ids`` are the features' FIDs (what QGIS shows as the feature id); ``skipped`` counts
    the features left out, by reason.
    """

    path: Path
    crs: str | None
    ids: np.ndarray
    classes: np.ndarray
    geometries: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)
    _moved: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> list[str]:
        return sorted(set(self.classes.tolist()))

    def in_crs(self, crs: Any) -> np.ndarray:
        """The polygons in ``crs`` (a rasterio CRS); a file without CRS is taken to be in it."""
        from rasterio.crs import CRS
        from rasterio.warp import transform_geom

        if self.crs is None:
            return self.geometries
        key = crs.to_wkt()
        if key not in self._moved:
            source = CRS.from_user_input(self.crs)
            if source == crs:
                moved = self.geometries
            else:
                moved = np.array([_reproject(source, crs, g, transform_geom) for g in self.geometries],
                                 dtype=object)
            self._moved[key] = moved
        return self._moved[key]


def _reproject(source: Any, target: Any, geometry: BaseGeometry, transform_geom: Any) -> BaseGeometry:
    try:
        moved = shapely.geometry.shape(transform_geom(source, target, shapely.geometry.mapping(geometry)))
    except Exception:  # noqa: BLE001 - a polygon the target CRS cannot hold lies outside every raster
        return shapely.Polygon()
    if not np.isfinite(moved.bounds).all():
        return shapely.Polygon()
    return _polygonal(moved) if not moved.is_valid else moved


def _polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a (repaired) geometry; empty when it has none."""
    geometry = shapely.make_valid(geometry)
    if geometry.geom_type in _POLYGONAL:
        return geometry
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in _POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def class_text(value: Any) -> str | None:
    """A class field's value as the class name (stripped text; ``None`` when empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # integer codes stored in a real field (shapefiles) stay "3"
    text = str(value).strip()
    return text or None


def read_labels(path: str | Path, class_field: str) -> Labels:
    """Every polygon of ``path``'s first layer with a non-empty ``class_field``.

    Raises :class:`CasdError` (naming the setting) for a missing file, a file that is not a
    vector layer, a missing field, and a layer without a labelled polygon.
    """
    path = Path(path)
    _check_field(_fields(path), class_field, "class_field", path, "the class")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
        import pyogrio.raw

        meta, fids, geometry, data = pyogrio.raw.read(str(path), columns=[class_field], return_fids=True)
    crs = meta.get("crs")
    if crs is not None:
        from rasterio.crs import CRS

        try:
            CRS.from_user_input(crs)
        except Exception:  # noqa: BLE001 - any CRS description GDAL cannot use
            raise CasdError(f"the CRS of the {param('labels')} {path.name} ({crs!r}) is not one GDAL knows; "
                            "save the layer with a valid CRS") from None
    shapes = shapely.from_wkb(geometry) if geometry is not None else np.array([], dtype=object)
    if fids is None:
        fids = np.arange(len(shapes))
    skipped: dict[str, int] = {}
    ids, classes, polygons = [], [], []
    for fid, shape, value in zip(fids, shapes, data[0] if data else [None] * len(shapes)):
        polygon = None if shape is None or shape.is_empty else _polygonal(shape)
        name = class_text(value)
        if polygon is None or polygon.is_empty or polygon.area <= 0:
            reason = "not a polygon (points, lines or empty geometries)"
        elif name is None:
            reason = f"empty {class_field!r}"
        else:
            ids.append(int(fid))
            classes.append(name)
            polygons.append(polygon)
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    if not polygons:
        if any(r.startswith("empty") for r in skipped):
            raise CasdError(f"every polygon of {path.name} has an empty {param('class_field')} "
                            f"{class_field!r}; fill it in or choose the field that holds the class")
        raise CasdError(f"{param('labels')} {path.name} holds no polygon; draw polygons around "
                        "examples of each class")
    return Labels(path, crs, np.asarray(ids, dtype=np.int64), np.asarray(classes, dtype=object),
                  np.asarray(polygons, dtype=object), skipped)


def _fields(path: Path) -> list[str]:
    """The attribute fields of the labels file's first layer; :class:`CasdError` for a file
    that is missing or not a vector file GDAL reads."""
    if not path.exists():
        raise CasdError(f"{param('labels')} {path} does not exist; check the path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import pyogrio
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
            info = pyogrio.read_info(str(path))
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types for unreadable files
        reason = str(exc).split("\n")[0]
        raise CasdError(f"{param('labels')} {path.name} is not a vector file GDAL can read ({reason}); "
                        "pass a GeoPackage, GeoJSON or shapefile with polygons") from None
    return [str(f) for f in info["fields"]]


def _check_field(fields: list[str], name: str, key: str, path: Path, holds: str) -> None:
    """Raise :class:`CasdError` naming setting ``key`` when ``name`` is not one of ``fields``."""
    if name in fields:
        return
    near = [f for f in fields if f.lower() == name.lower()]
    hint = f"did you mean {near[0]!r}? " if near else ""
    listed = f"its fields: {', '.join(fields)}" if fields else "it has no attribute fields"
    raise CasdError(f"{param(key)} {name!r} is not a field of {path.name} ({listed}); "
                    f"{hint}name the field that holds {holds}")


def read_class_colors(path: str | Path, class_field: str, color_field: str) -> dict[str, str]:
    """Each class's colour (``#rrggbb``) from the per-feature ``color_field`` of the labels
    ``path`` (features with an empty class or colour give none).

    Raises :class:`CasdError` naming the setting for a missing field, a value that is not a
    ``#rrggbb`` colour, and a class given two different colours.
    """
    path = Path(path)
    fields = _fields(path)
    _check_field(fields, class_field, "class_field", path, "the class")
    _check_field(fields, color_field, "color_field", path, "each polygon's colour (#rrggbb)")
    if color_field == class_field:
        raise CasdError(f"{param('color_field')} {color_field!r} is the {param('class_field')}; name the field "
                        "that holds each polygon's colour (#rrggbb)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
        import pyogrio.raw

        meta, fids, _, data = pyogrio.raw.read(str(path), columns=[class_field, color_field], read_geometry=False,
                                               return_fids=True)
    columns = dict(zip(meta["fields"], data))
    classes, values = columns[class_field], columns[color_field]
    colors: dict[str, tuple[str, int]] = {}  # class -> (colour, the first feature that gave it)
    for fid, value, text in zip(fids if fids is not None else range(len(classes)), classes, values):
        name, raw = class_text(value), class_text(text)
        if name is None or raw is None:
            continue
        color = normalized_color(raw)
        if color is None:
            raise CasdError(f"{param('color_field')} {color_field!r} of feature {int(fid)} of {path.name} holds "
                            f"{raw!r}, not a colour; write colours as #rrggbb, e.g. #1b7837")
        first = colors.setdefault(name, (color, int(fid)))
        if first[0] != color:
            raise CasdError(f"class {name!r} has two colours in {param('color_field')} {color_field!r} of "
                            f"{path.name}: {first[0]} (feature {first[1]}) and {color} (feature {int(fid)}); "
                            "give each class one colour")
    return {name: color for name, (color, _) in colors.items()}


def folder_names(class_names: list[str]) -> dict[str, str]:
    """A filesystem-safe folder name per class, distinct even on case-insensitive disks.

    Letters (any script), digits, ``-`` and ``.`` are kept; anything else becomes ``_``; names
    Windows reserves and clashes get a numeric suffix (``water_2``).
    """
    taken: set[str] = set()
    names = {}
    for name in class_names:
        text = unicodedata.normalize("NFC", name)
        safe = re.sub(r"[^\w.-]+", "_", text).strip("._ ")[:64] or "class"
        if safe.lower() in _RESERVED:
            safe += "_"
        candidate, n = safe, 2
        while candidate.lower() in taken:
            candidate, n = f"{safe}_{n}", n + 1
        taken.add(candidate.lower())
        names[name] = candidate
    return names
