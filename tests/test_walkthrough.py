"""The README's own-classes walk-through starts right: the example labels it ships
(docs/examples/naip_labels.geojson: water, crop and bare-field polygons traced over the real
NAIP tile, in WGS84) cut into chips of every class on that tile, with a spatial split.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import pyogrio.raw
import rasterio
import shapely

from casd_core.cli import main

EXAMPLE_LABELS = Path(__file__).resolve().parents[1] / "docs" / "examples" / "naip_labels.geojson"
NAIP = "m_4709963_se_14_1_20200831.tif"


def test_readme_example_labels_make_chips_of_every_class(rasters: Path, tmp_path: Path, capsys) -> None:
    raster = rasters / NAIP
    out = tmp_path / "chips"
    assert main(["chips", str(raster), "--labels", str(EXAMPLE_LABELS), "--class-field", "class",
                 "-o", str(out)]) == 0
    assert "EPSG:26914" in capsys.readouterr().out  # the WGS84 labels were reprojected onto the tile

    with (out / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_class = Counter(row["label"] for row in rows)
    assert set(per_class) == {"water", "crop", "bare"} and min(per_class.values()) >= 20, per_class
    sides = defaultdict(set)
    for row in rows:
        sides[(row["label"], row["group"])].add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), "a polygon's chips straddle the split"
    assert {row["split"] for row in rows if row["label"] == "bare"} == {"train", "test"}

    with rasterio.open(raster) as src:
        bounds = shapely.box(*src.bounds)
        water = src.read(4)  # NIR: open water is dark
        transform = src.transform
    meta, _, geometry, data = pyogrio.raw.read(str(out / "chips.gpkg"), layer="chips")
    column = dict(zip(meta["fields"], data))
    footprints = shapely.from_wkb(geometry)
    assert shapely.contains(bounds, footprints).all()
    nir = {name: [] for name in per_class}
    for name, footprint in zip(column["class_name"], footprints):
        x0, y0, x1, y1 = footprint.bounds
        col0, row0 = ~transform * (x0, y1)
        col1, row1 = ~transform * (x1, y0)
        nir[name].append(water[round(row0):round(row1), round(col0):round(col1)].mean())
    means = {name: sum(v) / len(v) for name, v in nir.items()}
    assert means["water"] < 60 < means["bare"] < means["crop"], means  # each chip shows its class
