"""`casd predict --suggest N`: the N tiles most worth labelling, least sure first, spread out."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest

from casd_core.cli import main
from casd_core.suggest import pick_uncertain
from casd_core.vectorio import read_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_suggestions_are_distinct_unsure_tiles_spread_over_the_raster(rasters, tmp_path, capsys):
    out = tmp_path / "tiles.gpkg"
    assert main(["predict", str(rasters / "test_tiled.tif"), "-o", str(out), "--tile-size", "60",
                 "--device", "cpu", "--quiet", "--suggest", "5"]) == 0
    assert "5 tile(s) to label next" in capsys.readouterr().out
    _, tiles, crs = read_layer(out, ["score", "row", "col"])
    _, picked, picked_crs = read_layer(tmp_path / "tiles_suggestions.gpkg", ["class", "score", "row", "col"])
    assert picked_crs == crs and len(picked["row"]) == 5
    cells = set(zip(picked["row"], picked["col"]))
    assert len(cells) == 5  # distinct tiles
    assert all(value is None for value in picked["class"])  # ready to be labelled
    lowest = np.sort(tiles["score"])[:20]  # among the 4N least sure
    assert all(score <= lowest[-1] for score in picked["score"])
    assert pyogrio.read_info(tmp_path / "tiles_suggestions.gpkg")["features"] == 5
    spacing = min(np.hypot(r1 - r2, c1 - c2) for r1, c1 in cells for r2, c2 in cells if (r1, c1) != (r2, c2))
    assert spacing >= 1.0  # no two suggestions are the same or neighbours across a corner


def test_spacing_beats_a_cluster_of_unsure_tiles():
    rows, cols = np.divmod(np.arange(100), 10)
    scores = np.ones(100)
    scores[[0, 1, 10, 11]] = [0.10, 0.11, 0.12, 0.13]  # a cluster of four very unsure tiles
    scores[[99, 55]] = [0.3, 0.4]
    picked = pick_uncertain(scores, rows, cols, 3)
    assert list(picked[:1]) == [0] and set(picked) == {0, 55, 99}


def test_suggest_needs_a_tile_layer(rasters, tmp_path, capsys):
    code = main(["predict", str(rasters / "test_tiled.tif"), "-o", str(tmp_path / "x.gpkg"),
                 "--suggest", "3", "--dissolve"])
    assert code == 2 and "--suggest" in capsys.readouterr().err
    assert not (tmp_path / "x.gpkg").exists()
