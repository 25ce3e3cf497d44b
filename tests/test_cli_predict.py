"""`casd predict` and `casd batch`: happy paths on the real rasters and every bad input.

Each bad input must give one clear line on stderr, exit code 2, no traceback and no output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window
from safetensors.torch import save_file
import torch

from casd_core.inference import raster as raster_planning
from casd_core.cli import main
from helpers import NAIP, build_test_package, derive_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--tile-size", "60", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_test_package(tmp_path_factory.mktemp("model") / "cli_model.safetensors")


@pytest.fixture(scope="module")
def bad(rasters, tmp_path_factory) -> dict[str, Path]:
    """Bad inputs, derived from the real rasters where a real file cannot show the case."""
    root = tmp_path_factory.mktemp("bad")
    tiled, naip = rasters / "test_tiled.tif", rasters / NAIP
    (root / "not_a_raster.tif").write_text("this is a text file with a .tif name\n")
    not_a_model = root / "not_a_model.safetensors"
    not_a_model.write_bytes(b"\x00" * 64)
    plain_safetensors = root / "weights_only.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain_safetensors))
    (root / "a_file").write_text("")
    return {
        "missing": root / "missing.tif",
        "not_a_raster": root / "not_a_raster.tif",
        "no_crs": derive_raster(tiled, root / "no_crs.tif", crs=None),
        "one_band": derive_raster(tiled, root / "one_band.tif", bands=[1]),
        "tiny": derive_raster(tiled, root / "tiny.tif", window=Window(0, 0, 100, 100)),
        "all_nodata": derive_raster(naip, root / "all_nodata.tif", edit=np.zeros_like),
        "not_a_model": not_a_model,
        "weights_only": plain_safetensors,
        "file_as_folder": root / "a_file",
    }


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case, args, message", [
    ("missing", [], "does not exist; check the path"),
    ("not_a_raster", [], "is not a raster GDAL can read"),
    ("no_crs", [], "has no coordinate reference system"),
    ("one_band", [], "the model expects 3 bands (red, green, blue) but one_band.tif has 1"),
    ("tiny", ["--tile-size", "120"], "smaller than one tile (120 m = 480×480 px)"),
    ("all_nodata", [], "holds only nodata"),
    ("not_a_model", ["--model-case"], "is not a CASD model package"),
    ("weights_only", ["--model-case"], "is not a CASD model package"),
    ("unwritable", [], "cannot write to output folder"),
    ("file_as_folder", [], "cannot write to output folder"),
    ("bad_bands", ["--bands", "1;2;3"], "is not a list of band numbers"),
    ("band_out_of_range", ["--bands", "1,2,9"], "band 9 does not exist"),
])
def test_bad_input_one_line_exit_2(capsys, tmp_path, rasters, model, bad, case, args, message):
    raster = bad.get(case, rasters / "test_tiled.tif")
    out = tmp_path / "out" / "result.gpkg"
    model_path = model
    if args[:1] == ["--model-case"]:
        model_path, raster, args = bad[case], rasters / "test_tiled.tif", []
    if case == "unwritable":
        out = Path("/proc/casd-no-such-dir/result.gpkg")
    if case == "file_as_folder":
        raster, out = rasters / "test_tiled.tif", bad[case] / "result.gpkg"
    argv = ["predict", str(raster), "-m", str(model_path), "-o", str(out), "--quiet",
            *(args or ["--tile-size", "60"])]
    if "--tile-size" not in argv:
        argv += ["--tile-size", "60"]
    code, stdout, stderr = _run(capsys, argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("casd predict: error: "), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    if out.parent.is_dir():
        assert list(out.parent.iterdir()) == []  # no partial file either


def test_all_nodata_found_after_reading_on_big_rasters(capsys, tmp_path, bad, model, monkeypatch):
    # large rasters skip the up-front check: every tile is read, skipped, then the same refusal
    monkeypatch.setattr(raster_planning, "_EARLY_NODATA_CHECK_PIXELS", 0)
    out = tmp_path / "nodata.gpkg"
    code, _, stderr = _run(capsys, ["predict", str(bad["all_nodata"]), "-m", str(model),
                                    "-o", str(out), "--tile-size", "1200", "--quiet"])
    assert code == 2 and "more than 50% nodata" in stderr and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_predict_then_refuse_to_overwrite(capsys, tmp_path, rasters, model):
    out = tmp_path / "tiled.gpkg"
    code, stdout, _ = _run(capsys, ["predict", str(rasters / "test_tiled.tif"), "-m", str(model),
                                    "-o", str(out), *FAST])
    assert code == 0 and "25 feature(s) from 25 tile(s)" in stdout and "tiles/s" in stdout
    assert pyogrio.read_info(out, layer="tiled")["crs"] == "EPSG:28992"
    code, _, stderr = _run(capsys, ["predict", str(rasters / "test_tiled.tif"), "-m", str(model),
                                    "-o", str(out), *FAST])
    assert code == 2 and "already exists; pass --overwrite" in stderr
    code, _, _ = _run(capsys, ["predict", str(rasters / "test_tiled.tif"), "-m", str(model),
                               "-o", str(out), "--overwrite", "--dissolve", *FAST])
    assert code == 0 and pyogrio.read_info(out, layer="tiled")["geometry_type"] == "MultiPolygon"


def test_default_model_and_progress_bar(capsys, tmp_path, rasters, model, monkeypatch):
    monkeypatch.setenv("CASD_DEFAULT_MODEL", str(model))
    out = tmp_path / "default.fgb"
    code, stdout, stderr = _run(capsys, ["predict", str(rasters / "test_tiled.tif"), "-o", str(out),
                                         "--tile-size", "60"])
    assert code == 0 and out.is_file() and (tmp_path / "default.qml").is_file()
    assert "25/25" in stderr and "tile/s" in stderr  # tqdm: tiles and tiles per second
    monkeypatch.setenv("CASD_DEFAULT_MODEL", str(tmp_path / "gone.safetensors"))
    code, _, stderr = _run(capsys, ["predict", str(rasters / "test_tiled.tif"), "-o",
                                    str(tmp_path / "x.gpkg"), "--quiet"])
    assert code == 2 and "default model" in stderr


def test_degrees_with_metres_works(capsys, tmp_path, rasters, model):
    """A raster in EPSG:4326 (degrees) with a tile size in metres: tiles 60 m on the ground."""
    source = rasters / "test_tiled.tif"
    degrees = tmp_path / "tiled_4326.tif"
    with rasterio.open(source) as src:
        transform, width, height = calculate_default_transform(
            src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": "EPSG:4326", "transform": transform, "width": width,
                                 "height": height, "compress": "deflate", "photometric": "rgb"}
        with rasterio.open(degrees, "w", **profile) as dst:
            for band in (1, 2, 3):
                reproject(rasterio.band(src, band), rasterio.band(dst, band))
    out = tmp_path / "deg.gpkg"
    code, _, stderr = _run(capsys, ["predict", str(degrees), "-m", str(model), "-o", str(out), *FAST])
    assert code == 0, stderr
    info = pyogrio.read_info(out, layer="deg")
    assert info["crs"] == "EPSG:4326" and 16 <= info["features"] <= 36  # ~250 m / 60 m per axis
    _, _, geometry, _ = pyogrio.raw.read(out, layer="deg")
    from rasterio.warp import transform_geom
    import shapely
    tile = shapely.from_wkb(geometry[0])
    in_rd = shapely.geometry.shape(transform_geom("EPSG:4326", "EPSG:28992", shapely.geometry.mapping(tile)))
    width_m = in_rd.bounds[2] - in_rd.bounds[0]
    assert width_m == pytest.approx(60, rel=0.03)


@pytest.fixture()
def folder(rasters, bad, tmp_path) -> Path:
    folder = tmp_path / "rasters"
    folder.mkdir()
    for name in ("test_tiled.tif", NAIP):
        (folder / name).symlink_to(rasters / name)
    (folder / "broken.tif").symlink_to(bad["not_a_raster"])
    return folder


def test_batch_summary_and_exit_code(capsys, folder, tmp_path, model):
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, ["batch", str(folder), "-m", str(model), "-o", str(out),
                                         "--tile-size", "240", "--quiet", "--merged"])
    assert code == 1, stderr  # one raster failed
    assert "broken.tif" in stdout and "failed" in stdout and "2 done" in stdout
    assert "merged layer" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["test_tiled.gpkg", NAIP.replace(".tif", ".gpkg"), "merged.gpkg", "summary.json"])
    (folder / "broken.tif").unlink()
    code, stdout, _ = _run(capsys, ["batch", str(folder), "-m", str(model), "-o", str(out),
                                    "--tile-size", "240", "--quiet"])
    assert code == 0 and "2 skipped" in stdout


def test_batch_killed_then_rerun_has_no_duplicates(capsys, rasters, tmp_path, model):
    """SIGKILL a real `casd batch` process after its first output, then rerun it."""
    folder = tmp_path / "many"
    folder.mkdir()
    names = [f"naip_{i}.tif" for i in range(6)]
    for name in names:
        (folder / name).symlink_to(rasters / NAIP)
    out = tmp_path / "out"
    argv = ["batch", str(folder), "-m", str(model), "-o", str(out), "--tile-size", "150",
            "--unit", "px", "--quiet"]
    child = subprocess.Popen([sys.executable, "-m", "casd_core.cli", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "naip_0.gpkg").exists() and child.poll() is None:
            assert time.monotonic() < deadline, "the batch never produced its first output"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    before = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert "naip_0.gpkg" in before and len(before) < len(names)  # killed mid-way
    code, stdout, _ = _run(capsys, argv)
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([*(n.replace(".tif", ".gpkg") for n in names), "summary.json"])  # no partial, no duplicate
    files.remove("summary.json")
    assert f"{len(before)} skipped" in stdout
    for name in files:
        assert pyogrio.read_info(out / name, layer=name[:-5])["features"] == 35  # 7 x 5 tiles
