"""The map you can look at: the PNG preview and the one-pixel-per-tile class raster, on the
real rasters labelled by the bundled model."""

from __future__ import annotations

import os
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from PIL import Image
from shapely.geometry import Polygon, box

from casd_core.class_raster import (CONFIDENCE_BANDS, confidence_path, grid_transform,
                                   write_class_raster)
from casd_core.errors import CasdError
from casd_core.inference import Predictor, classify_raster
from casd_core.preview import _read_rgba, render_preview
from casd_core.style import UNCERTAIN, UNCERTAIN_COLOR
from casd_core.tiling import TilingConfig, tile_grid
from helpers import NAIP, derive_raster, run_qgis_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILED = TilingConfig(tile_size=60, unit="m")  # 25 tiles over test_tiled.tif
# The upper-left half of test_tiled.tif: the lower-right tiles of the 5×5 grid fall outside.
TRIANGLE = Polygon([(127375, 428250), (127625, 428250), (127375, 428000)])


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_package(None, "cpu")  # the bundled model: labels that look right


@pytest.fixture(scope="module")
def package(predictor):
    return predictor.package


@pytest.fixture(scope="module")
def layers(rasters, predictor, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("layers")
    tiled = rasters / "test_tiled.tif"
    made = {"tiles": out / "tiles.gpkg", "dissolved": out / "dissolved.gpkg",
            "aoi": out / "aoi.gpkg", "naip": out / "naip.gpkg"}
    classify_raster(tiled, made["tiles"], predictor, TILED)
    classify_raster(tiled, made["dissolved"], predictor, TILED, dissolve=True)
    classify_raster(tiled, made["aoi"], predictor, TilingConfig(tile_size=60, aoi=TRIANGLE))
    classify_raster(rasters / NAIP, made["naip"], predictor, TilingConfig(tile_size=900, bands=(1, 2, 3)))
    return made


def _fields(path: Path) -> dict[str, np.ndarray]:
    meta, _, geometry, data = pyogrio.raw.read(str(path), layer=path.stem)
    return {"geometry": shapely.from_wkb(geometry), **dict(zip(meta["fields"], data))}


def _pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)


# --- preview -----------------------------------------------------------------------------------

def test_preview_of_test_tiled(rasters, layers, package, tmp_path):
    png = tmp_path / "sub" / "test_tiled.png"
    preview = render_preview(rasters / "test_tiled.tif", layers["tiles"], png, package)
    assert Path(os.fspath(preview)) == png and png.is_file()
    assert not [p for p in png.parent.iterdir() if p != png]  # atomic: no temp file left
    width, height = Image.open(png).size
    assert preview.size == (width, height)
    assert max(width, height) <= 1600 and min(width, height) >= 600
    pixels = _pixels(png)
    assert pixels.std() > 20  # imagery under the grid, not a blank canvas
    fields = _fields(layers["tiles"])
    names, counts = np.unique(fields["class_name"].astype(str), return_counts=True)
    assert {e.name: e.count for e in preview.legend} == dict(zip(names, counts.tolist()))
    assert [e.count for e in preview.legend] == sorted((e.count for e in preview.legend), reverse=True)
    for entry in preview.legend:  # the package's colours, not a palette's
        assert entry.color == package.class_colors[package.class_names.index(entry.name)]
    assert preview.tiles == 25


def test_preview_of_dissolved_layer(rasters, layers, package, tmp_path):
    tiles = render_preview(rasters / "test_tiled.tif", layers["tiles"], tmp_path / "t.png", package)
    regions = render_preview(rasters / "test_tiled.tif", layers["dissolved"], tmp_path / "d.png")
    # Same tiles by class (a region counts its tiles); colours keyed by name without a package.
    assert [(e.name, e.count, e.color) for e in regions.legend] == \
        [(e.name, e.count, e.color) for e in tiles.legend]
    assert regions.tiles == 25 and _pixels(tmp_path / "d.png").std() > 20


def test_preview_of_naip_four_bands(rasters, layers, tmp_path):
    png = tmp_path / "naip.png"
    preview = render_preview(rasters / NAIP, layers["naip"], png, bands=(1, 2, 3), max_size=800,
                             title="NAIP, bands 1-3")
    assert max(Image.open(png).size) <= 800 and _pixels(png).std() > 20
    assert preview.tiles == len(_fields(layers["naip"])["class_id"])
    for bad in [(1, 2), (2, 3, 5)]:
        with pytest.raises(CasdError, match="bands"):
            render_preview(rasters / NAIP, layers["naip"], tmp_path / "bad.png", bands=bad)
    assert not (tmp_path / "bad.png").exists()


def test_preview_of_one_band_with_nodata(rasters, layers, tmp_path):
    """One band is drawn grey; nodata pixels are left white (transparent over the page)."""
    def blank_corner(data):
        data = data.copy()
        data[:, :500, :500] = 0
        return data

    grey = derive_raster(rasters / "test_tiled.tif", tmp_path / "grey.tif", bands=[2],
                         edit=blank_corner, nodata=0)
    preview = render_preview(grey, layers["tiles"], tmp_path / "grey.png", max_size=600)
    assert preview.tiles == 25 and _pixels(preview.path).std() > 20
    with rasterio.open(grey) as src:
        rgba = _read_rgba(src, None, 100, 100)  # what is drawn: 100×100, alpha = valid
    assert rgba.shape == (100, 100, 4)
    assert (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all()
    assert (rgba[:50, :50, 3] == 0).all() and (rgba[50:, 50:, 3] == 1).all()


def _abstaining(tiles: Path, out: Path) -> Path:
    """The tile layer with 5 abstentions: features 0-2 with a null class id, 3-4 "uncertain"."""
    meta, _, geometry, data = pyogrio.raw.read(str(tiles), layer=tiles.stem)
    names = list(meta["fields"])
    data = [column.copy() for column in data]
    null = [np.zeros(len(geometry), bool) for _ in names]
    null[names.index("class_id")][:3] = True
    data[names.index("class_name")][3:5] = UNCERTAIN
    pyogrio.raw.write(str(out), geometry, data, names, field_mask=null, layer=out.stem,
                      driver="GPKG", geometry_type="Polygon", crs=meta["crs"])
    return out


def test_uncertain_tiles_are_grey_and_listed_last(rasters, layers, package, tmp_path):
    """Tiles named "uncertain" or with a null class id (a future abstain) are one grey entry."""
    layer = _abstaining(layers["tiles"], tmp_path / "abstain.gpkg")
    preview = render_preview(rasters / "test_tiled.tif", layer, tmp_path / "u.png", package)
    assert preview.legend[-1].name == UNCERTAIN and preview.legend[-1].count == 5
    assert preview.legend[-1].color == UNCERTAIN_COLOR
    assert sum(e.count for e in preview.legend) == 25


# --- class raster ------------------------------------------------------------------------------

def test_class_raster_is_one_pixel_per_tile(rasters, layers, package, tmp_path):
    grid = tile_grid(rasters / "test_tiled.tif", TILED, package)
    assert grid.edge_shifted == (True, True)  # 1000 px is not a multiple of the 240 px tile
    out = write_class_raster(layers["tiles"], grid, tmp_path / "classes.tif", package)
    fields = _fields(layers["tiles"])
    with rasterio.open(out) as src:
        classes, transform, colormap = src.read(1), src.transform, src.colormap(1)
        assert (src.dtypes[0], src.nodata, src.crs) == ("uint8", 255, grid.crs)
        assert src.descriptions == ("class_id",)
    assert classes.shape == grid.shape
    assert (classes[fields["row"], fields["col"]] == fields["class_id"]).all()
    last_row, last_col = grid.shape[0] - 1, grid.shape[1] - 1
    for polygon, row, col in zip(fields["geometry"], fields["row"], fields["col"]):
        cell = box(*(transform * (col, row + 1)), *(transform * (col + 1, row)))
        if row == last_row or col == last_col:  # the shifted edge tile: its cell reaches past it
            assert cell.intersection(polygon).area > 0
        else:
            assert polygon.contains(cell.centroid)
    for class_id in np.unique(classes):
        assert "#%02x%02x%02x" % colormap[class_id][:3] == package.class_colors[class_id]
    # What QGIS shows: the .qml sidecar's paletted classes, only those present, named.
    palette = ET.parse(out.with_suffix(".qml")).getroot().findall(".//paletteEntry")
    assert [(int(p.get("value")), p.get("label")) for p in palette] == \
        [(int(i), package.class_names[i]) for i in np.unique(classes)]
    from osgeo import gdal  # Debian's python3-gdal, installed with QGIS by scripts/setup.sh

    info = gdal.Info(str(out), format="json")
    assert info["bands"][0]["categories"] == package.class_names  # from <name>.aux.xml


def test_class_raster_nodata_and_confidence(rasters, layers, package, tmp_path):
    """Cells outside the AOI have no tile: nodata; probabilities go to a float32 companion."""
    grid = tile_grid(rasters / "test_tiled.tif", TilingConfig(tile_size=60, aoi=TRIANGLE), package)
    fields = _fields(layers["aoi"])
    assert grid.shape == (5, 5) and len(fields["row"]) == len(grid) < 25
    out = write_class_raster(layers["aoi"], grid, tmp_path / "aoi.tif", package, probabilities=True)
    with rasterio.open(out) as src:
        classes = src.read(1)
    labelled = np.zeros(grid.shape, bool)
    labelled[fields["row"], fields["col"]] = True
    assert (classes[~labelled] == 255).all() and (classes[labelled] == fields["class_id"]).all()
    with rasterio.open(confidence_path(out)) as src:
        assert src.count == 3 and src.dtypes[0] == "float32" and src.descriptions == CONFIDENCE_BANDS
        assert src.transform == grid_transform(grid)
        values = src.read()
    for band, name in enumerate(CONFIDENCE_BANDS):
        np.testing.assert_allclose(values[band][fields["row"], fields["col"]], fields[name], rtol=1e-6)
        assert np.isnan(values[band][~labelled]).all()


def test_class_raster_leaves_abstentions_nodata(rasters, layers, package, tmp_path):
    grid = tile_grid(rasters / "test_tiled.tif", TILED, package)
    layer = _abstaining(layers["tiles"], tmp_path / "abstain.gpkg")
    with rasterio.open(write_class_raster(layer, grid, tmp_path / "a.tif", package)) as src:
        classes = src.read(1)
    fields = _fields(layers["tiles"])
    cells = classes[fields["row"], fields["col"]]
    assert (cells[:5] == 255).all() and (cells[5:] == fields["class_id"][5:]).all()


def test_class_raster_refuses_a_layer_of_another_grid(rasters, layers, package, tmp_path):
    other = tile_grid(rasters / "test_tiled.tif", TilingConfig(tile_size=50), package)
    with pytest.raises(CasdError, match="not made on this tile grid"):
        write_class_raster(layers["tiles"], other, tmp_path / "x.tif", package)
    grid = tile_grid(rasters / "test_tiled.tif", TILED, package)
    with pytest.raises(CasdError, match="dissolved"):
        write_class_raster(layers["dissolved"], grid, tmp_path / "x.tif", package)
    assert not list(tmp_path.iterdir())


@pytest.mark.qgis
def test_class_raster_opens_paletted_in_qgis(rasters, layers, package, tmp_path):
    """The real QGIS (child process) shows the present classes by name in the package colours."""
    grid = tile_grid(rasters / "test_tiled.tif", TILED, package)
    out = write_class_raster(layers["tiles"], grid, tmp_path / "classes.tif", package)
    script = textwrap.dedent(f"""
        import json
        from qgis.core import QgsApplication, QgsRasterLayer
        app = QgsApplication([], False)
        app.initQgis()
        layer = QgsRasterLayer({str(out)!r}, "classes")
        renderer = layer.renderer()
        classes = [[int(c.value), c.label, c.color.name()] for c in renderer.classes()] \\
            if renderer.type() == "paletted" else []
        print("RESULT" + json.dumps({{"valid": layer.isValid(), "renderer": renderer.type(),
                                      "crs": layer.crs().authid(), "classes": classes}}))
        del layer, renderer
        app.exitQgis()
    """)
    results = run_qgis_script(script, tmp_path)
    assert len(results) == 1
    result = results[0]
    assert result["valid"] and result["renderer"] == "paletted" and result["crs"] == "EPSG:28992"
    with rasterio.open(out) as src:
        present = np.unique(src.read(1))
    assert result["classes"] == [[int(i), package.class_names[i], package.class_colors[i]]
                                 for i in present]
