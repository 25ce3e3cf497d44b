"""Write tile predictions as a vector layer (GeoPackage, GeoJSON, FlatGeobuf) with a QGIS style.

Every file is written atomically: features go to a hidden partial file beside the target
(``.<stem>.casd-partial-<pid><suffix>``), the style is added, and only then is it renamed to
the target name. A crash or cancel therefore leaves either no target file or the previous
complete one, never a file that looks complete; :func:`remove_stale_partials` sweeps partial
files whose writer process is gone.

The style is a categorised renderer on ``class_name`` with the package's colours and class
names (:func:`qml_style`). In a GeoPackage it is stored in the ``layer_styles`` table the way
QGIS stores it, as the layer's default, so QGIS opens the layer styled; other formats get a
``.qml`` file of the same stem beside them, which QGIS loads as the default style too.
"""

from __future__ import annotations

import array
import contextlib
import math
import os
import re
import sqlite3
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from casd_core.errors import CasdError

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

PARTIAL_MARK = ".casd-partial-"
_PARTIAL_RE = re.compile(r"^\..+\.casd-partial-(\d+)(\.[A-Za-z0-9]+)?(-wal|-shm|-journal)?$")


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
            raise CasdError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
        return key
    key = _SUFFIXES.get(Path(path).suffix.lower())
    if key is None:
        raise CasdError(f"cannot tell the output format from {Path(path).name!r}; end the name "
                        "with .gpkg, .geojson or .fgb, or pass --format")
    return key


def check_writable(path: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove a file can be created in it."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}{PARTIAL_MARK}{os.getpid()}.probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CasdError(f"cannot write to output folder {folder} ({reason}); choose a writable "
                        "folder for the output") from None
    if path.is_dir():
        raise CasdError(f"output {path} is a folder; give a file name such as {path / 'out.gpkg'}")
    return path


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the atomic rename."""
    return path.with_name(f".{path.stem}{PARTIAL_MARK}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a partial path to write; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = partial_path(path)
    _remove_with_aux(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove_with_aux(tmp)


def _remove_with_aux(path: Path) -> None:
    for candidate in (path, *(Path(f"{path}{aux}") for aux in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()


def remove_stale_partials(folder: str | os.PathLike) -> int:
    """Delete partial files (under ``folder``) whose writing process no longer runs."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for candidate in folder.rglob(f".*{PARTIAL_MARK}*"):
        match = _PARTIAL_RE.match(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- style -----------------------------------------------------------------------------------

def _rgba(color: str, alpha: int = 255) -> str:
    value = color.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    try:
        r, g, b = (int(value[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        r, g, b = 128, 128, 128
    return f"{r},{g},{b},{alpha}"


def _fill_symbol(name: str, color: str) -> str:
    props = {
        "border_width_map_unit_scale": "3x:0,0,0,0,0,0",
        "color": _rgba(color),
        "joinstyle": "bevel",
        "offset": "0,0",
        "offset_map_unit_scale": "3x:0,0,0,0,0,0",
        "offset_unit": "MM",
        "outline_color": "255,255,255,140",
        "outline_style": "solid",
        "outline_width": "0.1",
        "outline_width_unit": "MM",
        "style": "solid",
    }
    options = "\n".join(f'            <Option name="{k}" type="QString" value="{v}"/>'
                        for k, v in props.items())
    legacy = "\n".join(f'          <prop k="{k}" v="{v}"/>' for k, v in props.items())
    return f"""      <symbol alpha="0.7" clip_to_extent="1" force_rhr="0" name="{name}" type="fill">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
{options}
          </Option>
{legacy}
        </layer>
      </symbol>"""


def qml_style(package: Any) -> str:
    """A QGIS 3 style (QML): categorised on ``class_name``, one category per package class."""
    categories = "\n".join(
        f"      <category render=\"true\" symbol=\"{i}\" value={quoteattr(name)} "
        f"label={quoteattr(name)}/>"
        for i, name in enumerate(package.class_names))
    symbols = "\n".join(_fill_symbol(str(i), color)
                        for i, color in enumerate(package.class_colors))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis styleCategories="Symbology" version="3.22.0">
  <renderer-v2 attr="class_name" enableorderby="0" forceraster="0" symbollevels="0" type="categorizedSymbol">
    <categories>
{categories}
    </categories>
    <symbols>
{symbols}
    </symbols>
    <source-symbol>
{_fill_symbol("0", "#9e9e9e")}
    </source-symbol>
    <rotation/>
    <sizescale/>
  </renderer-v2>
  <blendMode>0</blendMode>
  <featureBlendMode>0</featureBlendMode>
  <layerGeometryType>2</layerGeometryType>
</qgis>
"""


_LAYER_STYLES_SQL = """CREATE TABLE IF NOT EXISTS layer_styles (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256),
    f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,
    useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
    update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""


def add_gpkg_style(path: str | os.PathLike, layer: str, qml: str,
                   description: str = "CASD scene classes") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles``."""
    con = sqlite3.connect(str(path))
    try:
        with con:
            row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                              (layer,)).fetchone()
            geometry_column = row[0] if row else "geom"
            con.execute(_LAYER_STYLES_SQL)
            con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,))
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, "
                "owner, ui) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL)",
                (layer, geometry_column, layer, qml, description))
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, "
                "description, last_change) VALUES ('layer_styles', 'attributes', 'layer_styles', "
                "'', strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
    finally:
        con.close()


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- writing ---------------------------------------------------------------------------------

class _Columns:
    """Compact column buffers filled one feature at a time: numbers in typed arrays, text as
    references to shared strings, geometry as WKB (~250 bytes per tile in all)."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self.geometry: list[bytes] = []
        self.values: dict[str, Any] = {
            name: [] if kind == "str" else array.array("q" if kind.startswith("int") else "d")
            for name, kind in fields}

    def append(self, geometry: BaseGeometry | bytes, record: dict[str, Any]) -> None:
        self.geometry.append(geometry if isinstance(geometry, bytes) else shapely.to_wkb(geometry))
        for name, kind in self.fields:
            value = record.get(name)
            if kind == "str":
                self.values[name].append(value)
            elif kind.startswith("int"):
                self.values[name].append(0 if value is None else int(value))
            else:  # NaN is written as null
                self.values[name].append(math.nan if value is None else float(value))

    def __len__(self) -> int:
        return len(self.geometry)

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


def layer_name_for(path: str | os.PathLike) -> str:
    """The layer name used inside a file: its stem, made safe for SQL identifiers."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", Path(path).stem).strip("_")
    return name or "predictions"


def write_layer(columns: _Columns, path: str | os.PathLike, crs: Any, fmt: str | None,
                package: Any | None, geometry_type: str = "Polygon") -> Path:
    """Write buffered features atomically, with the package's style when it is given."""
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
        _write_text_atomic(sidecar, qml)
    try:
        with atomic_output(path) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                pyogrio.raw.write(str(tmp), geometry, data, [name for name, _ in columns.fields],
                                  layer=layer, driver=driver,
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
                      dissolve: bool = False) -> int:
    """Write tile predictions (objects with ``geometry`` and the :data:`OUTPUT_FIELDS`) to
    ``path`` atomically; returns the number of features written.

    ``predictions`` may be a generator: it is consumed once, keeping only compact columns.
    With ``dissolve``, 4-connected tiles (by grid row/col) of the same class are merged into
    one region feature each (:data:`DISSOLVED_FIELDS`). Raises :class:`CasdError` when there
    is nothing to write.
    """
    columns = _Columns(OUTPUT_FIELDS)
    for prediction in predictions:
        columns.append(prediction.geometry, {name: getattr(prediction, name) for name, _ in OUTPUT_FIELDS})
    if len(columns) == 0:
        raise CasdError(f"no tile got a label, so {Path(path).name} was not written")
    geometry_type = "Polygon"
    if dissolve:
        columns, geometry_type = dissolve_columns(columns), "MultiPolygon"
    write_layer(columns, path, crs, fmt, package, geometry_type)
    return len(columns)


def dissolve_columns(columns: _Columns) -> _Columns:
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
            if j is not None and values["class_id"][j] == values["class_id"][i]:
                root_i, root_j = find(i), find(j)
                if root_i != root_j:
                    parent[root_j] = root_i
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = _Columns(DISSOLVED_FIELDS)
    for members in groups.values():
        polygons = shapely.from_wkb(np.array([columns.geometry[i] for i in members], dtype=object))
        region = shapely.union_all(polygons)
        first = members[0]
        out.append(region, {
            "class_id": values["class_id"][first],
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
    columns = _Columns(kinds + [SOURCE_FIELD])
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
