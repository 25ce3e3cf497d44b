"""Write tile predictions as a vector layer (GeoPackage, GeoJSON, FlatGeobuf) with a QGIS style.

Every file is written atomically: features go to a hidden partial file beside the target
(``.<stem>.casd-partial-<pid><suffix>``), the style is added, and only then is it renamed to
the target name. A crash or cancel therefore leaves either no target file or the previous
complete one, never a file that looks complete (:mod:`casd_core.atomic`).

The style (:mod:`casd_core.style`) is stored in a GeoPackage's ``layer_styles`` table as the
layer's default, so QGIS opens the layer styled; other formats get a ``.qml`` file of the
same stem beside them, which QGIS loads as the default style too.
"""

from __future__ import annotations

import array
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from casd_core.atomic import atomic_output, partial_path, write_text_atomic
from casd_core.errors import CasdError, param
from casd_core.style import add_gpkg_style, qml_style

# (name, type) of every per-tile field, in the order written. ``margin`` is top-1 minus top-2
# probability (0 = a coin toss between two classes); ``entropy`` is the Shannon entropy of the
# class probabilities divided by log(number of classes), so 0 = certain and 1 = uniform.
OUTPUT_FIELDS: list[tuple[str, str]] = [
    ("class_id", "int32"),
    ("class_name", "str"),
    ("score", "float64"),
    ("margin", "float64"),
    ("entropy", "float64"),
    ("top1_class", "str"),
    ("top1_prob", "float64"),
    ("top2_class", "str"),
    ("top2_prob", "float64"),
    ("top3_class", "str"),
    ("top3_prob", "float64"),
    ("row", "int32"),
    ("col", "int32"),
    ("nodata_fraction", "float64"),
    ("model", "str"),
]

# Fields of a dissolved layer: one feature per connected region of same-class tiles.
DISSOLVED_FIELDS: list[tuple[str, str]] = [
    ("class_id", "int32"),
    ("class_name", "str"),
    ("score", "float64"),  # mean top probability of the region's tiles
    ("margin", "float64"),  # mean top-2 margin
    ("entropy", "float64"),  # mean normalised entropy
    ("tile_count", "int32"),
    ("model", "str"),
]

SOURCE_FIELD = ("source", "str")

# format key -> (OGR driver, file suffix)
FORMATS: dict[str, tuple[str, str]] = {
    "gpkg": ("GPKG", ".gpkg"),
    "geojson": ("GeoJSON", ".geojson"),
    "fgb": ("FlatGeobuf", ".fgb"),
}
_SUFFIXES = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson", ".fgb": "fgb"}
_FORMAT_ALIASES = {"flatgeobuf": "fgb", "json": "geojson", "geopackage": "gpkg"}

def _pyogrio():
    # pyogrio imports pyproj when present; Debian's system pyproj (seen through the QGIS venv's
    # system site-packages) warns that it has no PROJ data. pyogrio never needs it here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import pyogrio
        import pyogrio.raw
    return pyogrio


def resolve_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format key ("gpkg", "geojson", "fgb") from ``fmt`` or else the file suffix."""
    if fmt:
        key = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
        if key not in FORMATS:
            raise CasdError(f"{param('format')} {fmt!r} is not one of {', '.join(FORMATS)}")
        return key
    key = _SUFFIXES.get(Path(path).suffix.lower())
    if key is None:
        raise CasdError(f"cannot tell the output format from {Path(path).name!r}; end the name "
                        f"with .gpkg, .geojson or .fgb, or choose the {param('format')}")
    return key


def check_writable(path: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove a file can be created in it."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = partial_path(path).with_suffix(".probe")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CasdError(f"cannot write to output folder {folder} ({reason}); choose a writable "
                        "folder for the output") from None
    if path.is_dir():
        raise CasdError(f"output {path} is a folder; give a file name such as {path / 'out.gpkg'}")
    return path


# --- writing ---------------------------------------------------------------------------------

class FeatureColumns:
    """Compact column buffers filled one feature at a time: numbers in typed arrays, text as
    references to shared strings, geometry as WKB (~250 bytes per tile in all)."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self.geometry: list[bytes] = []
        self.values: dict[str, Any] = {
            name: [] if kind == "str" else array.array("q" if kind.startswith("int") else "d")
            for name, kind in fields}
        self.null_rows: dict[str, list[int]] = {}  # integer fields: rows written as null

    def append(self, geometry: BaseGeometry | bytes, record: dict[str, Any]) -> None:
        self.geometry.append(geometry if isinstance(geometry, bytes) else shapely.to_wkb(geometry))
        for name, kind in self.fields:
            value = record.get(name)
            if kind == "str":
                self.values[name].append(value)
            elif kind.startswith("int"):
                if value is None:
                    self.null_rows.setdefault(name, []).append(len(self.geometry) - 1)
                self.values[name].append(0 if value is None else int(value))
            else:  # NaN is written as null
                self.values[name].append(math.nan if value is None else float(value))

    def __len__(self) -> int:
        return len(self.geometry)

    def masks(self) -> list[np.ndarray | None] | None:
        """Per field, where it is null (integer fields only; NaN floats are null anyway)."""
        if not self.null_rows:
            return None
        out = []
        for name, _ in self.fields:
            rows = self.null_rows.get(name)
            mask = None
            if rows:
                mask = np.zeros(len(self), dtype=bool)
                mask[rows] = True
            out.append(mask)
        return out

    def arrays(self) -> tuple[np.ndarray, list[np.ndarray]]:
        geometry = np.empty(len(self.geometry), dtype=object)
        geometry[:] = self.geometry
        data = []
        for name, kind in self.fields:
            values = self.values[name]
            if kind == "str":
                column = np.empty(len(values), dtype=object)
                column[:] = values
            else:
                column = np.frombuffer(values, dtype=np.int64 if values.typecode == "q"
                                       else np.float64).astype(kind)
            data.append(column)
        return geometry, data


def read_layer(path: str | os.PathLike, columns: list[str], optional: tuple[str, ...] = (),
               hint: str = "") -> tuple[np.ndarray, dict[str, np.ndarray], str | None]:
    """(WKB geometries, {field: values}, CRS) of the casd layer in ``path`` (the layer named
    after its stem, else its first one); ``columns`` must exist, ``optional`` ones are read
    when they do. ``hint`` ends the message when a column is missing."""
    pyogrio = _pyogrio()
    path = Path(path)
    if not path.exists():
        raise CasdError(f"layer {path} does not exist; pass the file written by casd predict")
    names = [str(n) for n, _ in pyogrio.list_layers(str(path)) if n != "layer_styles"]
    name = layer_name_for(path) if layer_name_for(path) in names else (names or [None])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
        present = set(pyogrio.read_info(str(path), layer=name)["fields"])
        missing = [c for c in columns if c not in present]
        if missing:
            raise CasdError(f"layer {path.name} lacks the field(s) {', '.join(missing)}{hint}; "
                            "pass the layer written by casd predict")
        wanted = columns + [c for c in optional if c in present]
        meta, _, geometry, data = pyogrio.raw.read(str(path), layer=name, columns=wanted)
    return geometry, dict(zip(meta["fields"], data)), meta.get("crs")  # in the layer's field order


def layer_name_for(path: str | os.PathLike) -> str:
    """The layer name used inside a file: its stem, made safe for SQL identifiers."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", Path(path).stem).strip("_")
    return name or "predictions"


def write_layer(columns: FeatureColumns, path: str | os.PathLike, crs: Any, fmt: str | None,
                package: Any | None, geometry_type: str = "Polygon",
                metadata: dict[str, str] | None = None) -> Path:
    """Write buffered features atomically, with the package's style when it is given and
    ``metadata`` as the layer's metadata items (GeoPackage, FlatGeobuf; GeoJSON has none)."""
    pyogrio = _pyogrio()
    path = Path(path)
    key = resolve_format(path, fmt)
    driver, _ = FORMATS[key]
    layer = layer_name_for(path)
    crs_wkt = crs.to_wkt() if hasattr(crs, "to_wkt") else (str(crs) if crs else None)
    geometry, data = columns.arrays()
    qml = qml_style(package) if package is not None else None
    sidecar = path.with_suffix(".qml") if qml is not None and key != "gpkg" else None
    new_sidecar = sidecar is not None and not sidecar.exists()
    if sidecar is not None:  # first, so the layer never appears without its style
        write_text_atomic(qml, sidecar)
    try:
        with atomic_output(path) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                pyogrio.raw.write(str(tmp), geometry, data, [name for name, _ in columns.fields],
                                  field_mask=columns.masks(), layer=layer, driver=driver,
                                  layer_metadata=metadata if key != "geojson" else None,
                                  geometry_type=geometry_type, crs=crs_wkt,
                                  promote_to_multi=geometry_type.startswith("Multi"))
            if qml is not None and key == "gpkg":
                add_gpkg_style(tmp, layer, qml)
    except BaseException:
        if new_sidecar:
            sidecar.unlink(missing_ok=True)
        raise
    return path


def write_predictions(predictions: Iterable[Any], path: str | os.PathLike, crs: Any,
                      fmt: str | None = None, package: Any | None = None,
                      dissolve: bool = False, metadata: dict[str, str] | None = None) -> int:
    """Write tile predictions (objects with ``geometry`` and the :data:`OUTPUT_FIELDS`) to
    ``path`` atomically; returns the number of features written.

    ``predictions`` may be a generator: it is consumed once, keeping only compact columns.
    With ``dissolve``, 4-connected tiles (by grid row/col) of the same class are merged into
    one region feature each (:data:`DISSOLVED_FIELDS`). Raises :class:`CasdError` when there
    is nothing to write.
    """
    columns = FeatureColumns(OUTPUT_FIELDS)
    for prediction in predictions:
        columns.append(prediction.geometry, {name: getattr(prediction, name) for name, _ in OUTPUT_FIELDS})
    if len(columns) == 0:
        raise CasdError(f"no tile got a label, so {Path(path).name} was not written")
    geometry_type = "Polygon"
    if dissolve:
        columns, geometry_type = dissolve_columns(columns), "MultiPolygon"
    write_layer(columns, path, crs, fmt, package, geometry_type, metadata)
    return len(columns)


def dissolve_columns(columns: FeatureColumns) -> FeatureColumns:
    """Merge 4-connected same-class tiles into regions (union of their polygons)."""
    values = columns.values
    n = len(columns)
    position = {(values["row"][i], values["col"][i]): i for i in range(n)}
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for neighbour in ((values["row"][i] + 1, values["col"][i]),
                          (values["row"][i], values["col"][i] + 1)):
            j = position.get(neighbour)
            if j is not None and values["class_name"][j] == values["class_name"][i]:
                root_i, root_j = find(i), find(j)
                if root_i != root_j:
                    parent[root_j] = root_i
    abstained = set(columns.null_rows.get("class_id", ()))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = FeatureColumns(DISSOLVED_FIELDS)
    for members in groups.values():
        polygons = shapely.from_wkb(np.array([columns.geometry[i] for i in members], dtype=object))
        region = shapely.union_all(polygons)
        first = members[0]
        out.append(region, {
            "class_id": None if first in abstained else values["class_id"][first],
            "class_name": values["class_name"][first],
            "score": float(np.mean([values["score"][i] for i in members])),
            "margin": float(np.mean([values["margin"][i] for i in members])),
            "entropy": float(np.mean([values["entropy"][i] for i in members])),
            "tile_count": len(members),
            "model": values["model"][first],
        })
    return out


def merge_layers(sources: list[tuple[str, Path]], path: str | os.PathLike, fmt: str | None,
                 package: Any | None) -> int:
    """One layer from several prediction files, with a ``source`` field naming each one's raster.

    Features keep their CRS when all inputs share one; otherwise they are reprojected to
    EPSG:4326. Returns the number of features written.
    """
    pyogrio = _pyogrio()
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_transform

    layers = []
    for source, file in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            meta, _, geometry, field_data = pyogrio.raw.read(str(file), layer=layer_name_for(file))
        layers.append((source, meta, geometry, field_data))
    if not layers:
        raise CasdError("no prediction file to merge")
    crs_texts = {meta["crs"] for _, meta, _, _ in layers}
    target = CRS.from_user_input(layers[0][1]["crs"]) if len(crs_texts) == 1 else CRS.from_epsg(4326)
    fields = list(zip(layers[0][1]["fields"], layers[0][1]["dtypes"]))
    kinds = [(name, "str" if dtype == "object" else str(dtype)) for name, dtype in fields]
    columns = FeatureColumns(kinds + [SOURCE_FIELD])
    for source, meta, geometry, field_data in layers:
        if len(crs_texts) > 1:
            src_crs = CRS.from_user_input(meta["crs"])

            def reproject(xy: np.ndarray, src_crs=src_crs) -> np.ndarray:
                xs, ys = warp_transform(src_crs, target, xy[:, 0], xy[:, 1])
                return np.column_stack([xs, ys])

            geometry = shapely.to_wkb(shapely.transform(shapely.from_wkb(geometry), reproject))
        names = list(meta["fields"])
        for i, wkb in enumerate(geometry):
            record = {name: _plain(field_data[k][i]) for k, name in enumerate(names)}
            record["source"] = source
            columns.append(wkb, record)
    geometry_type = layers[0][1].get("geometry_type") or "Polygon"
    geometry_type = "MultiPolygon" if "Multi" in geometry_type else "Polygon"
    write_layer(columns, path, target, fmt, package, geometry_type)
    return len(columns)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def read_aoi(path: str | os.PathLike) -> tuple[BaseGeometry, str | None]:
    """The union of a vector file's polygons and its CRS (WKT, or ``None`` when it has none)."""
    pyogrio = _pyogrio()
    path = Path(path)
    if not path.exists():
        raise CasdError(f"AOI file {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
            meta, _, geometry, _ = pyogrio.raw.read(str(path), columns=[])
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types for unreadable files
        reason = str(exc).split("\n")[0]
        raise CasdError(f"AOI file {path.name} is not a vector file GDAL can read ({reason}); "
                        "pass a GeoPackage, GeoJSON or shapefile with polygons") from None
    shapes = shapely.from_wkb(geometry) if geometry is not None else np.array([])
    polygons = [g for g in shapes if g is not None and not g.is_empty and g.area > 0]
    if not polygons:
        raise CasdError(f"AOI file {path.name} holds no polygon; pass a layer with polygons")
    aoi = shapely.union_all(shapely.make_valid(np.asarray(polygons, dtype=object)))
    return aoi, meta.get("crs")
