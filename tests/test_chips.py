"""`casd chips` on a real "map": a mosaic of real AID train images with polygons in a new
taxonomy over it (built-up, water, vegetation, transport / roads).

The mosaic is 6 × 6 cells of 150 × 150 px at 1 m in EPSG:32633; cell (r, c) is one AID
image of split_20's train rows. The polygons (FID: class, cells as rows × columns):

    1  built-up            rows 0-1 × cols 0-2
    2  transport / roads   rows 0-1 × cols 3-5            (one polygon only: too few)
    3  water               rows 2-3 × cols 0-2, and 30 m into col 3
    4  vegetation          rows 2-3 × cols 3-5, from 30 m into col 3   (col 3: mixed, dropped)
    5  vegetation          rows 4-5 × col 0-1
    6  water               rows 4-5 × the west half of col 2           (50 %: below coverage)
    7  built-up            rows 4-5 × cols 3-4
    8  water               rows 4-5 × col 5
    9  water               10 km away                                   (outside the raster)
    10 (no class)          over row 0
"""

from __future__ import annotations

import csv
from dataclasses import replace
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.transform import from_origin
from rasterio.warp import transform_geom

from casd_core.chips import ChipConfig, folder_names, group_split, make_chips
from casd_core.cli import build_parser, main
from casd_core.data import read_split
from casd_core.errors import Cancelled, CasdError
from casd_core.progress import Monitor
from casd_core.style import class_colors_for, training_class_colors

CELL, N = 150, 6
X0, Y0 = 500000.0, 5000000.0
CRS_UTM = "EPSG:32633"
TAXONOMY = {
    "built-up": ["DenseResidential", "MediumResidential", "SparseResidential", "Commercial", "Industrial"],
    "water": ["Pond", "River"],
    "vegetation": ["Forest", "Meadow", "Farmland"],
    "transport / roads": ["Airport", "Parking", "Viaduct"],
}
# The class each cell shows (row by row).
LAYOUT = [
    ["built-up"] * 3 + ["transport / roads"] * 3,
    ["built-up"] * 3 + ["transport / roads"] * 3,
    ["water"] * 3 + ["vegetation"] * 3,
    ["water"] * 3 + ["vegetation"] * 3,
    ["vegetation"] * 2 + ["water"] + ["built-up"] * 2 + ["water"],
    ["vegetation"] * 2 + ["water"] + ["built-up"] * 2 + ["water"],
]
TILE = ChipConfig(tile_size=CELL, unit="px")


def cells(r0: int, r1: int, x0: float, x1: float) -> shapely.Polygon:
    """Rows r0..r1-1, from x0 to x1 metres east of the mosaic's west edge."""
    return shapely.box(X0 + x0, Y0 - CELL * r1, X0 + x1, Y0 - CELL * r0)


POLYGONS = [  # (fid, class, polygon in EPSG:32633)
    (1, "built-up", cells(0, 2, 0, 450)),
    (2, "transport / roads", cells(0, 2, 450, 900)),
    (3, "water", cells(2, 4, 0, 480)),
    (4, "vegetation", cells(2, 4, 480, 900)),
    (5, "vegetation", cells(4, 6, 0, 300)),
    (6, "water", cells(4, 6, 300, 375)),
    (7, "built-up", cells(4, 6, 450, 750)),
    (8, "water", cells(4, 6, 750, 900)),
    (9, "water", shapely.box(X0 + 10000, Y0, X0 + 10300, Y0 + 300)),
    (10, None, cells(0, 1, 0, 900)),
]


def write_labels(path: Path, crs: str) -> Path:
    geometries = [shapely.geometry.shape(transform_geom(CRS_UTM, crs, shapely.geometry.mapping(g)))
                  if crs != CRS_UTM else g for _, _, g in POLYGONS]
    pyogrio.raw.write(str(path), np.array(shapely.to_wkb(geometries), dtype=object),
                      [np.array([c for _, c, _ in POLYGONS], dtype=object)], ["class"], driver="GPKG",
                      geometry_type="Polygon", crs=crs)
    return path


@pytest.fixture(scope="module")
def world(aid_root, tmp_path_factory) -> dict:
    """The mosaic, its 4-band uint16 copy, the labels in EPSG:4326 and in the mosaic's CRS."""
    root = tmp_path_factory.mktemp("chips_world")
    with (aid_root / "split_20.csv").open(newline="") as handle:
        train = sorted(row["path"] for row in csv.DictReader(handle) if row["split"] == "train")
    by_class = defaultdict(list)
    for path in train:
        by_class[path.split("/")[0]].append(path)
    used = defaultdict(int)
    mosaic = np.zeros((3, N * CELL, N * CELL), dtype=np.uint8)
    sources = {}
    for r, row in enumerate(LAYOUT):
        for c, name in enumerate(row):
            aid = TAXONOMY[name][used[name] % len(TAXONOMY[name])]
            path = by_class[aid][used[name] // len(TAXONOMY[name])]
            used[name] += 1
            with Image.open(aid_root / path) as image:
                pixels = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
            assert pixels.shape == (3, CELL, CELL)
            mosaic[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = pixels
            sources[(r, c)] = pixels
    profile = {"driver": "GTiff", "width": N * CELL, "height": N * CELL, "crs": CRS_UTM,
               "transform": from_origin(X0, Y0, 1.0, 1.0), "compress": "deflate", "tiled": True,
               "blockxsize": 256, "blockysize": 256}
    rgb = root / "mosaic.tif"
    with rasterio.open(rgb, "w", count=3, dtype="uint8", photometric="rgb", **profile) as dst:
        dst.write(mosaic)
    # 4 bands, uint16, nodata 0: cell (0, 0) all nodata, cell (0, 1) a 30 % strip of it.
    wide = np.concatenate([mosaic.astype(np.uint16) * 257, mosaic[1:2].astype(np.uint16) * 200 + 7])
    wide[:, :CELL, :CELL] = 0
    wide[:, :45, CELL:2 * CELL] = 0
    uint16 = root / "mosaic_nir16.tif"
    with rasterio.open(uint16, "w", count=4, dtype="uint16", nodata=0, **profile) as dst:
        dst.write(wide)
    return {"rgb": rgb, "uint16": uint16, "sources": sources, "wide": wide, "root": root,
            "labels": write_labels(root / "labels_4326.gpkg", "EPSG:4326"),
            "labels_utm": write_labels(root / "labels_utm.gpkg", CRS_UTM)}


def read_rows(out: Path) -> list[dict]:
    with (out / "split.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_index(out: Path) -> dict[str, np.ndarray]:
    meta, _, geometry, data = pyogrio.raw.read(str(out / "chips.gpkg"), layer="chips")
    return {"crs": meta["crs"], "geometry": shapely.from_wkb(geometry),
            **{name: column for name, column in zip(meta["fields"], data)}}


@pytest.fixture(scope="module")
def chips(world, tmp_path_factory) -> tuple[Path, object]:
    """Chips of the RGB mosaic from the EPSG:4326 labels, 150 px tiles, stride 150."""
    out = tmp_path_factory.mktemp("chips") / "chipdir"
    return out, make_chips([world["rgb"]], world["labels"], "class", out, ChipConfig(**vars(TILE)))


def test_chips_reproduce_the_source_pixels_in_class_folders(chips, world):
    out, summary = chips
    rows = read_rows(out)
    assert len(rows) == summary.chips == 32
    for row in rows:
        folder, name = row["path"].split("/")
        assert folder == folder_names(sorted(TAXONOMY))[row["label"]]
        r, c = (int(v) for v in Path(name).stem.split("_")[-2:])
        assert LAYOUT[r][c] == row["label"]
        with rasterio.open(out / row["path"]) as chip:
            assert chip.crs == CRS_UTM and chip.count == 3 and chip.dtypes[0] == "uint8"
            assert chip.transform == from_origin(X0 + c * CELL, Y0 - r * CELL, 1.0, 1.0)
            assert chip.compression is not None
            np.testing.assert_array_equal(chip.read(), world["sources"][(r, c)])
    assert {r["label"] for r in rows} == set(TAXONOMY)
    assert "transport_roads/mosaic_0_3.tif" in {r["path"] for r in rows}  # sanitised folder, real label
    assert not list(out.rglob(".*")), "no partial or hidden file left behind"


def test_summary_counts_what_was_left_out_and_why(chips):
    _, summary = chips
    counts = {name: (c.chips, c.polygons, c.groups) for name, c in summary.classes.items()}
    assert counts == {"built-up": (10, 2, 2), "transport / roads": (6, 1, 1), "vegetation": (8, 2, 2),
                      "water": (8, 2, 2)}
    assert (summary.dropped_mixed, summary.dropped_low_coverage, summary.skipped_nodata) == (2, 2, 0)
    assert summary.polygons == 9 and summary.polygons_outside == [9]
    assert summary.polygons_without_chips == [6]
    assert summary.labels_skipped == {"empty 'class'": 1}
    assert set(summary.too_few) == {"transport / roads", "vegetation", "water"}  # < 10 chips or 1 polygon
    assert "no spatial test split" in summary.too_few["transport / roads"]
    assert summary.index_crs == CRS_UTM and summary.tile == "150 px"
    table = summary.table()
    assert "2 mixed-class" in table and "ids 9" in table and "min_coverage" in table


def test_split_is_spatial_and_readable_by_training(chips):
    out, summary = chips
    rows = read_rows(out)
    index = read_index(out)
    split_of_polygon = defaultdict(set)
    for polygon, split in zip(index["polygon_id"], index["split"]):
        split_of_polygon[int(polygon)].add(split)
    assert all(len(s) == 1 for s in split_of_polygon.values()), split_of_polygon
    for name, c in summary.classes.items():
        assert (c.test > 0) == (c.groups >= 2), name  # every class with two polygons is tested
        assert c.train > 0
    splits, class_names = read_split(out / "split.csv", out)
    assert class_names == sorted(TAXONOMY)
    assert len(splits["train"]) + len(splits["test"]) == 32
    assert all(s.path.is_file() for s in splits["train"] + splits["test"])
    # the index tells QGIS the same story: footprints on the cells, styled by class
    assert index["crs"] == CRS_UTM and sorted(index["path"]) == sorted(r["path"] for r in rows)
    assert all(g.area == CELL * CELL for g in index["geometry"])
    info = pyogrio.read_info(str(out / "chips.gpkg"), layer="chips")
    assert "casd_chips" in info["layer_metadata"]
    import sqlite3

    with sqlite3.connect(out / "chips.gpkg") as con:
        qml = con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'chips'").fetchone()[0]
    assert 'attr="class_name"' in qml and all(f'value="{name}"' in qml for name in TAXONOMY)


def test_reprojected_labels_land_on_the_same_chips(chips, world, tmp_path):
    out, _ = chips
    utm = make_chips([world["rgb"]], world["labels_utm"], "class", tmp_path / "utm", ChipConfig(**vars(TILE)))
    assert (tmp_path / "utm" / "split.csv").read_text() == (out / "split.csv").read_text()
    assert (utm.dropped_mixed, utm.dropped_low_coverage) == (2, 2)


def test_overlapping_chips_of_a_class_share_their_group(world, tmp_path):
    out = tmp_path / "stride"
    summary = make_chips([world["rgb"]], world["labels"], "class", out,
                         ChipConfig(**{**vars(TILE), "stride": 75.0}))
    index = read_index(out)
    assert summary.chips > 2 * 32
    boxes = index["geometry"]
    a, b = shapely.STRtree(boxes).query(boxes, predicate="overlaps")
    same = index["class_name"][a] == index["class_name"][b]
    assert same.any()
    assert (index["group"][a[same]] == index["group"][b[same]]).all()
    assert (index["split"][a[same]] == index["split"][b[same]]).all()
    # a chip half on polygon 3 and a quarter on polygon 6 (both water) joins them: no group 6
    assert set(index["group"][index["class_name"] == "water"]) == {"polygon:3", "polygon:8"}


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_labels_without_crs_are_taken_in_the_rasters_crs(world, tmp_path):
    bare = tmp_path / "bare.gpkg"
    pyogrio.raw.write(str(bare), np.array(shapely.to_wkb([g for _, _, g in POLYGONS]), dtype=object),
                      [np.array([c for _, c, _ in POLYGONS], dtype=object)], ["class"], driver="GPKG",
                      geometry_type="Polygon")
    warnings = []
    make_chips([world["rgb"]], bare, "class", tmp_path / "bare", ChipConfig(**vars(TILE)),
               Monitor(on_warning=warnings.append))
    assert len(warnings) == 1 and "no CRS" in warnings[0]
    make_chips([world["rgb"]], world["labels_utm"], "class", tmp_path / "utm", ChipConfig(**vars(TILE)))
    assert (tmp_path / "bare" / "split.csv").read_text() == (tmp_path / "utm" / "split.csv").read_text()


def test_block_split_keeps_each_block_on_one_side(world, tmp_path):
    summary = make_chips([world["rgb"]], world["labels"], "class", tmp_path / "blocks",
                         ChipConfig(**{**vars(TILE), "split_by": "block", "block_size": 300.0, "seed": 3}))
    rows = read_rows(tmp_path / "blocks")
    sides = defaultdict(set)
    for row in rows:
        assert row["group"].startswith("block:")
        sides[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert len(sides) > 4 and {r["split"] for r in rows} == {"train", "test"}
    assert summary.classes["built-up"].test > 0


def test_multiband_uint16_chips_keep_bands_dtype_and_nodata(world, tmp_path):
    out = tmp_path / "wide"
    summary = make_chips([world["uint16"]], world["labels"], "class", out, ChipConfig(**vars(TILE)))
    assert summary.skipped_nodata == 1  # cell (0, 0); cell (0, 1) is 30 % nodata and kept
    rows = {r["path"]: r for r in read_rows(out)}
    assert "built-up/mosaic_nir16_0_0.tif" not in rows and "built-up/mosaic_nir16_0_1.tif" in rows
    index = read_index(out)
    fraction = dict(zip(index["path"], index["nodata_fraction"]))
    assert fraction["built-up/mosaic_nir16_0_1.tif"] == pytest.approx(0.3)
    for path in rows:
        r, c = (int(v) for v in Path(path).stem.split("_")[-2:])
        with rasterio.open(out / path) as chip:
            assert chip.count == 4 and chip.dtypes == ("uint16",) * 4 and chip.nodata == 0
            np.testing.assert_array_equal(
                chip.read(), world["wide"][:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL])


def test_rasters_in_different_crss_index_in_wgs84(world, tmp_path):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    moved = tmp_path / "mercator.tif"
    with rasterio.open(world["rgb"]) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height,
                                                               *src.bounds)
        with rasterio.open(moved, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                           crs="EPSG:3857", transform=transform) as dst:
            reproject(rasterio.band(src, [1, 2, 3]), rasterio.band(dst, [1, 2, 3]),
                      resampling=Resampling.nearest)
    summary = make_chips([world["rgb"], moved], world["labels"], "class", tmp_path / "two",
                         ChipConfig(**vars(TILE)))
    assert summary.index_crs == "EPSG:4326"
    index = read_index(tmp_path / "two")
    assert {Path(r).name for r in index["raster"]} == {"mosaic.tif", "mercator.tif"}
    lon, lat = shapely.geometry.shape(transform_geom(CRS_UTM, "EPSG:4326", {
        "type": "Point", "coordinates": (X0 + 450, Y0 - 450)})).coords[0]
    assert all(abs(g.centroid.x - lon) < 0.01 and abs(g.centroid.y - lat) < 0.01 for g in index["geometry"])
    split = defaultdict(set)
    for polygon, s in zip(index["polygon_id"], index["split"]):
        split[int(polygon)].add(s)  # one polygon's chips from both rasters stay on one side
    assert all(len(s) == 1 for s in split.values())


def test_default_tile_is_the_embedded_models_footprint(world, tmp_path):
    summary = make_chips([world["rgb"]], world["labels_utm"], "class", tmp_path / "default",
                         ChipConfig(min_coverage=0.5))
    assert summary.tile == "120 m"
    with rasterio.open(next((tmp_path / "default").rglob("*.tif"))) as chip:
        assert (chip.width, chip.height) == (120, 120)


def test_cancel_leaves_no_chip_and_rerun_needs_overwrite(world, tmp_path):
    out = tmp_path / "cancelled"
    calls = []
    monitor = Monitor(is_cancelled=lambda: calls.append(1) or len(calls) > 5)
    with pytest.raises(Cancelled):
        make_chips([world["rgb"]], world["labels"], "class", out, ChipConfig(**vars(TILE)), monitor)
    assert not [p for p in out.rglob("*") if p.is_file()]
    make_chips([world["rgb"]], world["labels"], "class", out, ChipConfig(**vars(TILE)))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CasdError) as error:
        make_chips([world["rgb"]], world["labels"], "class", out, ChipConfig(**vars(TILE)))
    assert error.value.params == ["out_dir", "overwrite"]
    again = make_chips([world["rgb"]], world["labels_utm"], "class", out,
                       ChipConfig(**{**vars(TILE), "min_coverage": 0.4, "overwrite": True}))
    assert again.chips == 34 and len(read_rows(out)) == 34  # the half-covered cells now count
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.rglob("*.tif"))) == 34


def test_group_split_holds_out_whole_groups_per_class():
    labels = ["a"] * 30 + ["b"] * 12 + ["c"] * 5
    groups = [f"a{i // 5}" for i in range(30)] + [f"b{i // 4}" for i in range(12)] + ["c0"] * 5
    kept, held = group_split(labels, groups, 0.2, seed=1)
    assert sorted(kept + held) == list(range(len(labels)))
    assert not {groups[i] for i in kept} & {groups[i] for i in held}
    held_per_class = {c: sum(labels[i] == c for i in held) for c in "abc"}
    assert held_per_class == {"a": 5, "b": 4, "c": 0}  # c has one group: it stays in train
    assert group_split(labels, groups, 0.2, seed=1) == (kept, held)
    assert group_split(labels, groups, 0.0, seed=1) == (list(range(len(labels))), [])


def test_folder_names_are_safe_and_distinct():
    names = folder_names(["built up", "Built_Up", "wet/pond", "CON", "..", "Forêt"])
    assert names == {"built up": "built_up", "Built_Up": "Built_Up_2", "wet/pond": "wet_pond",
                     "CON": "CON_", "..": "class", "Forêt": "Forêt"}


def test_bad_inputs_name_the_setting(world, tmp_path):
    def error(**kwargs) -> CasdError:
        args = {"rasters": [world["rgb"]], "labels": world["labels"], "class_field": "class",
                "out_dir": tmp_path / "bad", "config": ChipConfig(**vars(TILE))} | kwargs
        with pytest.raises(CasdError) as info:
            make_chips(**args)
        return info.value

    assert error(class_field="Class").params[0] == "class_field"
    assert "did you mean 'class'" in str(error(class_field="Class"))
    assert error(labels=world["rgb"]).params[0] == "labels"
    assert error(labels=tmp_path / "missing.gpkg").params[0] == "labels"
    far = tmp_path / "far.gpkg"
    pyogrio.raw.write(str(far), np.array([shapely.to_wkb(POLYGONS[8][2])], dtype=object),
                      [np.array(["water"], dtype=object)], ["class"], driver="GPKG", crs=CRS_UTM,
                      geometry_type="Polygon")
    assert error(labels=far).params[0] == "labels"  # nothing usable: every polygon outside
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(world["rgb"]) as src:
        profile = src.profile | {"crs": None}
        with rasterio.open(no_crs, "w", **profile) as dst:
            dst.write(src.read())
    assert error(rasters=[no_crs]).params[0] == "rasters"
    assert error(rasters=[world["rgb"], world["uint16"]]).params[0] == "rasters"
    assert error(config=ChipConfig(min_coverage=0)).params[0] == "min_coverage"
    assert error(config=ChipConfig(split_by="random")).params[0] == "split_by"
    assert error(config=ChipConfig(tile_size=2000, unit="px")).params[0] == "tile_size"
    assert error(config=ChipConfig(model=tmp_path / "none.safetensors")).params[0] == "model"
    assert not (tmp_path / "bad").exists()


def test_cli_makes_chips_and_prints_the_table(world, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["chips", str(world["rgb"]), "--labels", str(world["labels"]), "--class-field", "class",
                 "-o", str(out), "--tile-size", "150", "--unit", "px", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "built-up" in text and "32 chip(s) of 150 px" in text and "--min-coverage" in text
    assert len(read_rows(out)) == 32


@pytest.mark.parametrize("case, flag", [
    ("field", "--class-field"), ("labels", "--labels"), ("exists", "--output"), ("coverage", "--min-coverage")])
def test_cli_bad_input_is_one_line_naming_the_flag(world, tmp_path, capsys, case, flag):
    out = tmp_path / "out"
    args = {"field": ["--class-field", "kind"], "labels": ["--labels", str(world["rgb"])],
            "exists": [], "coverage": ["--min-coverage", "1.5"]}[case]
    if case == "exists":
        out.mkdir()
        (out / "x").write_text("")
    base = {"--labels": str(world["labels"]), "--class-field": "class"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    code = main(["chips", str(world["rgb"]), "-o", str(out), "--tile-size", "150", "--unit", "px", "--quiet",
                 *[v for pair in base.items() for v in pair]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert "Traceback" not in err


def test_cli_help_shows_the_config_defaults(capsys):
    parser = build_parser()
    action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    chips = action.choices["chips"]
    defaults = {name: field.default for name, field in ChipConfig.__dataclass_fields__.items()
                if name != "class_colors"}  # read from the --color-field of the labels
    checked = 0
    for a in chips._actions:
        if a.dest in defaults:
            assert a.default == defaults[a.dest], a.dest
            checked += 1
    assert checked == len(defaults)
    with pytest.raises(SystemExit):
        parser.parse_args(["chips", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text


# -- the analyst's class colours -------------------------------------------------------------

ANALYST = {"built-up": "#C0392B", "water": "#2e86c1", "vegetation": "#1E8449"}  # transport / roads: none


def expected_colors(given: dict[str, str]) -> dict[str, str]:
    """Each class's colour: the analyst's (as #rrggbb in lower case), else the default."""
    names = sorted(TAXONOMY)
    return {name: given.get(name, default).lower() for name, default in zip(names, class_colors_for(names))}


def index_colors(out: Path) -> dict[str, str]:
    """Class → #rrggbb of the categories in the style chips.gpkg carries for QGIS."""
    import sqlite3
    import xml.etree.ElementTree as ElementTree

    with sqlite3.connect(out / "chips.gpkg") as con:
        qml = con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'chips'").fetchone()[0]
    renderer = ElementTree.fromstring(qml).find("renderer-v2")
    fill = {symbol.get("name"): symbol.find("layer/Option/Option[@name='color']").get("value")
            for symbol in renderer.find("symbols")}
    return {category.get("value"): "#{:02x}{:02x}{:02x}".format(*map(int, fill[category.get("symbol")].split(",")[:3]))
            for category in renderer.find("categories") if category.get("value") != "uncertain"}


def classes_json(out: Path) -> dict[str, str]:
    import json

    return {c["name"]: c["color"] for c in json.loads((out / "classes.json").read_text())["classes"]}


def test_class_colors_style_the_index_and_go_to_classes_json(world, tmp_path):
    import json

    out = tmp_path / "coloured"
    make_chips([world["rgb"]], world["labels"], "class", out,
               ChipConfig(**{**vars(TILE), "class_colors": {**ANALYST, "glacier": "#ffffff"}}))
    assert classes_json(out) == index_colors(out) == expected_colors(ANALYST)  # glacier: no chips, left out
    folders = {c["name"]: c["folder"] for c in json.loads((out / "classes.json").read_text())["classes"]}
    assert folders == folder_names(sorted(TAXONOMY))
    # a model trained on the chips keeps them: by class name beside split.csv, by folder without it
    assert training_class_colors(sorted(TAXONOMY), out / "split.csv", out) == list(expected_colors(ANALYST).values())
    by_folder = sorted(folders.values())
    assert training_class_colors(by_folder, None, out) == [
        expected_colors(ANALYST)[next(n for n, f in folders.items() if f == folder)] for folder in by_folder]

    warnings = []
    (out / "classes.json").write_text('{"classes": [{"name": "water", "color": "blue"}]}')
    assert training_class_colors(sorted(TAXONOMY), out / "split.csv", out, warnings.append) == class_colors_for(
        sorted(TAXONOMY))
    assert len(warnings) == 1 and "classes.json" in warnings[0] and "default class colours" in warnings[0]

    make_chips([world["rgb"]], world["labels"], "class", out, ChipConfig(**{**vars(TILE), "overwrite": True}))
    assert not (out / "classes.json").exists(), "a stale classes.json is removed with the chips"
    assert index_colors(out) == expected_colors({})

    with pytest.raises(CasdError) as error:
        make_chips([world["rgb"]], world["labels"], "class", tmp_path / "bad",
                   ChipConfig(**{**vars(TILE), "class_colors": {"water": "blue"}}))
    assert error.value.params == ["class_colors"] and "'blue'" in str(error.value)
    assert not (tmp_path / "bad").exists()


def write_coloured_labels(path: Path, colors: dict[int, str]) -> Path:
    """The labels of POLYGONS (EPSG:32633) with a ``color`` field: ``colors`` by FID, else empty."""
    pyogrio.raw.write(str(path), np.array(shapely.to_wkb([g for _, _, g in POLYGONS]), dtype=object),
                      [np.array([c for _, c, _ in POLYGONS], dtype=object),
                       np.array([colors.get(fid, "") for fid, _, _ in POLYGONS], dtype=object)],
                      ["class", "color"], driver="GPKG", geometry_type="Polygon", crs=CRS_UTM)
    return path


def test_cli_reads_each_class_colour_from_the_color_field(world, tmp_path, capsys):
    # every polygon of a class in its colour (any case, spaces around), transport / roads without;
    # the unclassed polygon 10's colour belongs to no class
    colors = {fid: ANALYST[name] for fid, name, _ in POLYGONS if name in ANALYST}
    colors.update({3: " #2E86C1 ", 10: "#000000"})
    labels = write_coloured_labels(tmp_path / "coloured.gpkg", colors)
    base = ["chips", str(world["rgb"]), "--labels", str(labels), "--class-field", "class", "--tile-size", "150",
            "--unit", "px", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "cli"), "--color-field", "color"]) == 0
    assert classes_json(tmp_path / "cli") == index_colors(tmp_path / "cli") == expected_colors(ANALYST)
    assert main([*base, "-o", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "classes.json").exists()
    capsys.readouterr()

    for case, more, said in [
            ("two colours", {8: "#0000ff"}, ["'water'", "#2e86c1", "#0000ff", "feature 8"]),
            ("not a colour", {5: "green"}, ["'green'", "feature 5", "#rrggbb"]),
            ("no such field", {}, ["'colour'", "its fields"])]:
        labels = write_coloured_labels(tmp_path / "bad.gpkg", {**colors, **more})
        out = tmp_path / case.replace(" ", "_")
        code = main([*base, "--labels", str(labels), "-o", str(out),
                     "--color-field", "colour" if case == "no such field" else "color"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "--color-field" in err, (case, err)
        assert all(text in err for text in said) and "Traceback" not in err, (case, err)
        assert not out.exists()


def test_a_model_trained_on_coloured_chips_keeps_the_colours_and_a_run_resumes(world, tmp_path, one_torch_thread):
    """Colours are not a training setting: chips re-cut with colours resume the run cut without,
    and a finished run asked again takes the chips' new colours without retraining."""
    import torch

    from casd_core.package import ModelPackage
    from casd_core.train import TrainConfig, train

    chips_dir, run = tmp_path / "chips", tmp_path / "run"
    make_chips([world["rgb"]], world["labels"], "class", chips_dir, ChipConfig(**vars(TILE)))
    split = (chips_dir / "split.csv").read_text()
    config = TrainConfig(data_root=chips_dir, split_csv=chips_dir / "split.csv", out_dir=run, method="ce",
                         pretrained=None, epochs=2, batch_size=8, input_size=32, val_fraction=0.25, device="cpu",
                         workers=0)
    items: list[str] = []
    monitor = Monitor(on_progress=lambda event: items.append(event.item),
                      is_cancelled=lambda: any(item.startswith("epoch 2/") for item in items))
    with pytest.raises(Cancelled):
        train(config, monitor)
    first_epoch = (run / "metrics.jsonl").read_text()
    assert len(first_epoch.splitlines()) == 1

    make_chips([world["rgb"]], world["labels"], "class", chips_dir,
               ChipConfig(**{**vars(TILE), "class_colors": ANALYST, "overwrite": True}))
    assert (chips_dir / "split.csv").read_text() == split
    result = train(config)
    history = (run / "metrics.jsonl").read_text()
    assert history.startswith(first_epoch) and len(history.splitlines()) == 2  # resumed, not refused
    package = ModelPackage.load(result.package_path)
    assert dict(zip(package.class_names, package.class_colors)) == expected_colors(ANALYST)

    # restyled and run again: the finished package takes the new colours without retraining
    restyled = {**ANALYST, "water": "#00ffff"}
    make_chips([world["rgb"]], world["labels"], "class", chips_dir,
               ChipConfig(**{**vars(TILE), "class_colors": restyled, "overwrite": True}))
    again = ModelPackage.load(train(config).package_path)
    assert dict(zip(again.class_names, again.class_colors)) == expected_colors(restyled)
    assert (run / "metrics.jsonl").read_text() == history
    assert all(torch.equal(again.state_dict[k], package.state_dict[k]) for k in package.state_dict)

    # fine-tuned from it on chips without colours: the classes keep the starting package's
    plain = tmp_path / "plain_chips"
    make_chips([world["rgb"]], world["labels"], "class", plain, ChipConfig(**vars(TILE)))
    tuned = train(replace(config, data_root=plain, split_csv=plain / "split.csv", out_dir=tmp_path / "tuned",
                          init=str(result.package_path), epochs=1))
    tuned = ModelPackage.load(tuned.package_path)
    assert dict(zip(tuned.class_names, tuned.class_colors)) == expected_colors(restyled)
