"""The result layer's QGIS style: categorised on ``class_name``, in the package's colours and
class names, as QML; and storing it in a GeoPackage the way QGIS does (``layer_styles``).
Class colours: the analyst's where known (a chip folder's ``classes.json``), defaults otherwise."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping
from xml.sax.saxutils import quoteattr

# Colours that read naturally on a map for the AID classes; other classes get a palette colour.
AID_COLORS = {
    "Airport": "#8c8c8c", "BareLand": "#d8c8a0", "BaseballField": "#c7e9a0",
    "Beach": "#f5e6a8", "Bridge": "#a05a2c", "Center": "#e31a1c",
    "Church": "#b15928", "Commercial": "#fb6a4a", "DenseResidential": "#a50f15",
    "Desert": "#f2d08a", "Farmland": "#e6d36b", "Forest": "#1b7837",
    "Industrial": "#6a3d9a", "Meadow": "#a6d96a", "MediumResidential": "#ef6548",
    "Mountain": "#7f6a4d", "Park": "#5aae61", "Parking": "#bdbdbd",
    "Playground": "#fdae61", "Pond": "#6baed6", "Port": "#2c7fb8",
    "RailwayStation": "#525252", "Resort": "#f781bf", "River": "#2171b5",
    "School": "#fec44f", "SparseResidential": "#fcbba1", "Square": "#d9d9d9",
    "Stadium": "#cab2d6", "StorageTanks": "#737373", "Viaduct": "#8c510a",
}
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
    "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]


def default_class_colors(class_names: list[str]) -> list[str]:
    """A map-friendly colour per class: fixed ones for AID classes, a palette otherwise."""
    return [AID_COLORS.get(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(class_names)]


# Beside a chip folder's split.csv: the colour of each class of its chips, which the model
# trained on them keeps (``{"classes": [{"name": ..., "folder": ..., "color": "#rrggbb"}, ...]}``).
CLASSES_FILE = "classes.json"
_HEX_COLOR = re.compile(r"#[0-9a-f]{6}")


def normalized_color(value: Any) -> str | None:
    """``value`` as ``#rrggbb`` in lower case when it is such a colour (any case, spaces
    around), else ``None``."""
    text = value.strip().lower() if isinstance(value, str) else ""
    return text if _HEX_COLOR.fullmatch(text) else None


def class_colors_for(class_names: list[str], colors: Mapping[str, str] | None = None) -> list[str]:
    """A colour per class: the one ``colors`` gives it (the analyst's), else the default."""
    colors = colors or {}
    return [colors.get(name, default) for name, default in zip(class_names, default_class_colors(class_names))]


def training_class_colors(class_names: list[str], split_csv: Path | None, data_root: Path,
                          warn: Callable[[str], None] | None = None,
                          inherited: Mapping[str, str] | None = None) -> list[str]:
    """The colours a model trained on ``class_names`` keeps: those the :data:`CLASSES_FILE`
    beside ``split_csv`` gives a class by name (in ``data_root`` without a CSV: by folder, as a
    class-folder tree's classes are its folder names), else the ``inherited`` ones (a
    fine-tune's starting package, by class name), else the defaults.

    A file that cannot be read is reported through ``warn`` and left out: it is read at the end
    of a training run, and colours are never worth failing a run for.
    """
    inherited = dict(inherited or {})
    path = (Path(split_csv).parent if split_csv else Path(data_root)) / CLASSES_FILE
    if not path.is_file():
        return class_colors_for(class_names, inherited)
    key = "name" if split_csv else "folder"  # without a CSV the classes are the folders
    colors: dict[str, str] = {}
    try:
        for entry in json.loads(path.read_text(encoding="utf-8"))["classes"]:
            color = normalized_color(entry.get("color"))
            if color is None:
                raise ValueError(f"class {entry.get('name')!r} has no #rrggbb colour")
            colors[str(entry[key])] = color
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if warn is not None:
            warn(f"{path} is not a class colour file casd chips writes ({error}); the model gets the "
                 "default class colours")
        return class_colors_for(class_names, inherited)
    return class_colors_for(class_names, {**inherited, **colors})


def class_color(name: str, package: Any | None = None) -> str:
    """The colour of a class: the package's, else the AID map colour, else a name-keyed one."""
    if name == UNCERTAIN:
        return UNCERTAIN_COLOR
    if package is not None and name in package.class_names:
        return package.class_colors[package.class_names.index(name)]
    return AID_COLORS.get(name) or PALETTE[zlib.crc32(name.encode("utf-8")) % len(PALETTE)]


# The class name of tiles that abstained (too unsure), and their colour.
UNCERTAIN = "uncertain"
UNCERTAIN_COLOR = "#9e9e9e"


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
    """A QGIS 3 style (QML): categorised on ``class_name``, one category per package class,
    and a grey one for tiles that abstained (``uncertain``)."""
    names = [*package.class_names, UNCERTAIN]
    colors = [*package.class_colors, UNCERTAIN_COLOR]
    categories = "\n".join(
        f"      <category render=\"true\" symbol=\"{i}\" value={quoteattr(name)} "
        f"label={quoteattr(name)}/>"
        for i, name in enumerate(names))
    symbols = "\n".join(_fill_symbol(str(i), color) for i, color in enumerate(colors))
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
{_fill_symbol("0", UNCERTAIN_COLOR)}
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
