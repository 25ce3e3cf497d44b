"""Vector output: fields, CRS, formats, atomic writes, dissolve, and the QGIS style."""

from __future__ import annotations

import json
import os
import sqlite3
import textwrap
import xml.etree.ElementTree as ET

import pyogrio
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import box

from casd_core.errors import CasdError
from casd_core.inference import TilePrediction, classify_raster
from casd_core.package import ModelPackage
from casd_core.tiling import TilingConfig
from casd_core.atomic import remove_stale_partials
from casd_core.style import UNCERTAIN, qml_style
from casd_core.vectorio import DISSOLVED_FIELDS, OUTPUT_FIELDS, read_aoi, write_predictions
from helpers import AID_CLASSES, build_test_package, run_qgis_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RD_NEW = CRS.from_epsg(28992)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> ModelPackage:
    return ModelPackage.load(build_test_package(tmp_path_factory.mktemp("pkg") / "vec.safetensors"))


def _prediction(row: int, col: int, class_id: int, size: float = 10.0) -> TilePrediction:
    x, y = 1000 + col * size, 2000 - (row + 1) * size
    name = AID_CLASSES[class_id]
    return TilePrediction(
        geometry=box(x, y, x + size, y + size), row=row, col=col,
        window=Window(col * 40, row * 40, 40, 40), class_id=class_id, class_name=name,
        score=0.6, margin=0.3, entropy=0.4, top1_class=name, top1_prob=0.6,
        top2_class=AID_CLASSES[(class_id + 1) % 30], top2_prob=0.3,
        top3_class=AID_CLASSES[(class_id + 2) % 30], top3_prob=0.05,
        nodata_fraction=0.1 * col, model="unit")


def _grid(classes: list[list[int]]) -> list[TilePrediction]:
    return [_prediction(r, c, k) for r, row in enumerate(classes) for c, k in enumerate(row)]


@pytest.mark.parametrize("suffix, driver", [(".gpkg", "GPKG"), (".geojson", "GeoJSON"),
                                            (".fgb", "FlatGeobuf")])
def test_fields_and_crs_read_back(tmp_path, package, suffix, driver):
    predictions = _grid([[0, 1, 2], [3, 4, 5]])
    out = tmp_path / f"tiles{suffix}"
    assert write_predictions(iter(predictions), out, RD_NEW, None, package) == 6
    info = pyogrio.read_info(out, layer="tiles")
    assert info["driver"] == driver and info["features"] == 6
    assert info["crs"] == "EPSG:28992" and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == [name for name, _ in OUTPUT_FIELDS]
    _, _, geometry, values = pyogrio.raw.read(out, layer="tiles")
    fields = dict(zip(info["fields"], values))
    # FlatGeobuf's spatial index reorders features: compare by grid position
    order = sorted(range(6), key=lambda i: (fields["row"][i], fields["col"][i]))
    assert [fields["class_name"][i] for i in order] == [p.class_name for p in predictions]
    assert [(fields["row"][i], fields["col"][i]) for i in order] == [(p.row, p.col) for p in predictions]
    assert [fields["nodata_fraction"][i] for i in order] == pytest.approx([p.nodata_fraction for p in predictions])
    assert fields["top2_prob"][0] == pytest.approx(0.3) and fields["model"][0] == "unit"
    assert shapely.from_wkb(geometry[order[4]]).equals(predictions[4].geometry)
    style = out.with_suffix(".qml")
    assert style.is_file() == (suffix != ".gpkg")  # GeoPackages carry it inside
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name] + ([style.name] if suffix != ".gpkg" else []))


def test_geopackage_carries_default_style(tmp_path, package):
    out = tmp_path / "styled.gpkg"
    write_predictions(_grid([[0, 9]]), out, RD_NEW, "gpkg", package)
    with sqlite3.connect(out) as con:
        rows = con.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML "
                           "FROM layer_styles").fetchall()
        kind = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name='layer_styles'").fetchone()
    assert len(rows) == 1 and kind == ("attributes",)
    table, geometry_column, default, qml = rows[0]
    assert (table, geometry_column, default) == ("styled", "geom", 1)
    assert qml == qml_style(package)


def test_qml_is_a_categorised_renderer_with_package_colours(package):
    root = ET.fromstring(qml_style(package).split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
    categories = renderer.findall("categories/category")
    assert [c.get("value") for c in categories] == [*package.class_names, UNCERTAIN]
    assert [c.get("label") for c in categories] == [*package.class_names, UNCERTAIN]
    symbols = {s.get("name"): s for s in renderer.findall("symbols/symbol")}
    forest = categories[package.class_names.index("Forest")]
    colour = symbols[forest.get("symbol")].find("layer/Option/Option[@name='color']").get("value")
    hex_colour = package.class_colors[package.class_names.index("Forest")]
    assert colour == ",".join(str(int(hex_colour[i:i + 2], 16)) for i in (1, 3, 5)) + ",255"


def test_write_is_atomic(tmp_path, package):
    out = tmp_path / "atomic.gpkg"
    write_predictions(_grid([[0]]), out, RD_NEW, None, package)
    before = out.read_bytes()

    def crashing():
        yield from _grid([[1, 2]])
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        write_predictions(crashing(), out, RD_NEW, None, package)
    assert out.read_bytes() == before  # the old complete file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["atomic.gpkg"]
    with pytest.raises(CasdError, match="no tile got a label"):
        write_predictions([], tmp_path / "empty.gpkg", RD_NEW, None, package)
    assert not (tmp_path / "empty.gpkg").exists()


def test_stale_partials_are_swept(tmp_path):
    dead = tmp_path / ".x.casd-partial-999999999.gpkg"
    alive = tmp_path / f".y.casd-partial-{os.getpid()}.gpkg"
    other = tmp_path / ".hidden.gpkg"
    for path in (dead, alive, other):
        path.write_bytes(b"")
    assert remove_stale_partials(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_dissolve_merges_connected_same_class_tiles(tmp_path, package):
    # class 0 forms an L of 4 tiles, class 1 two separate single tiles, class 2 a pair
    classes = [[0, 0, 1],
               [0, 2, 2],
               [0, 1, 3]]
    out = tmp_path / "regions.gpkg"
    assert write_predictions(_grid(classes), out, RD_NEW, None, package, dissolve=True) == 5
    info = pyogrio.read_info(out, layer="regions")
    assert list(info["fields"]) == [name for name, _ in DISSOLVED_FIELDS]
    assert info["geometry_type"] == "MultiPolygon"
    _, _, geometry, values = pyogrio.raw.read(out, layer="regions")
    fields = dict(zip(info["fields"], values))
    regions = sorted(zip(fields["class_id"], fields["tile_count"],
                         [shapely.from_wkb(g).area for g in geometry]))
    assert regions == [(0, 4, 400.0), (1, 1, 100.0), (1, 1, 100.0), (2, 2, 200.0), (3, 1, 100.0)]
    l_shape = shapely.from_wkb(geometry[list(fields["tile_count"]).index(4)])
    assert len(shapely.get_parts(l_shape)) == 1  # one region polygon, not four squares


def test_read_aoi(tmp_path):
    aoi = box(0, 0, 10, 10).union(box(20, 0, 30, 10))
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(g)}
        for g in shapely.get_parts(aoi)]}))
    geometry, crs = read_aoi(path)
    assert geometry.equals(aoi) and "4326" in crs
    with pytest.raises(CasdError, match="does not exist"):
        read_aoi(tmp_path / "missing.gpkg")
    (tmp_path / "bad.gpkg").write_text("nope")
    with pytest.raises(CasdError, match="not a vector file"):
        read_aoi(tmp_path / "bad.gpkg")


@pytest.mark.qgis
def test_geopackage_opens_styled_in_qgis(rasters, tmp_path, package):
    """The real QGIS (in a child process: a QGIS crash cannot take pytest down) opens the
    output as a valid layer in the raster's CRS, with the fields and the categorised style."""
    outputs = [tmp_path / "qgis_check.gpkg", tmp_path / "qgis_check.geojson"]
    for out in outputs:  # the GeoJSON is styled by its .qml sidecar
        classify_raster(rasters / "test_tiled.tif", out, package, TilingConfig(tile_size=60, unit="m"))
    script = textwrap.dedent(f"""
        import gc, json
        from qgis.core import QgsApplication, QgsVectorLayer
        app = QgsApplication([], False)
        app.initQgis()
        for path in {[str(o) for o in outputs]!r}:
            layer = QgsVectorLayer(path, "tiles", "ogr")
            renderer = layer.renderer()
            categorised = renderer.type() == "categorizedSymbol"
            result = {{
                "valid": layer.isValid(), "crs": layer.crs().authid(),
                "fields": [f.name() for f in layer.fields()], "count": layer.featureCount(),
                "renderer": renderer.type(), "attr": renderer.classAttribute() if categorised else None,
                "categories": [c.value() for c in renderer.categories()] if categorised else [],
                "forest": next((c.symbol().color().name() for c in renderer.categories()
                                if c.value() == "Forest"), None) if categorised else None,
            }}
            print("RESULT" + json.dumps(result))
            del layer, renderer
            gc.collect()
        app.exitQgis()
    """)
    results = run_qgis_script(script, tmp_path)
    assert len(results) == 2
    for result in results:
        assert result["valid"] and result["crs"] == "EPSG:28992" and result["count"] == 25
        assert [name for name in result["fields"] if name != "fid"] == [n for n, _ in OUTPUT_FIELDS]
        assert result["renderer"] == "categorizedSymbol" and result["attr"] == "class_name"
        assert result["categories"] == [*package.class_names, UNCERTAIN]
        assert result["forest"] == package.class_colors[package.class_names.index("Forest")].lower()
