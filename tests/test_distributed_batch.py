"""`casd batch` and `casd predict` under torchrun: 2 gloo ranks on CPU over real rasters.

The outputs must be the files one process writes; `summary.json` says which rank did what; a
rank killed with SIGKILL leaves a folder that a rerun completes with no duplicate or partial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from rasterio.windows import Window

from casd_core.cli import main
from casd_core.inference.batch import share_by_pixels
from helpers import NAIP, build_test_package, derive_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 64-px tiles read 1:1 by the 64-px test model; the overlap makes each raster take long
# enough (~1 s per raster per rank) for a kill to land mid-way.
FAST = ["--tile-size", "64", "--unit", "px", "--overlap", "0.5", "--quiet"]
# --standalone: a free port, so this file can run beside other torchrun jobs.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "casd_core.cli"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_test_package(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def folder(rasters, tmp_path_factory) -> Path:
    """Real rasters of four sizes (so pixel balancing differs from file counting), one in a
    sub-folder, plus one file that is not a raster."""
    folder = tmp_path_factory.mktemp("in")
    tiled, naip = rasters / "test_tiled.tif", rasters / NAIP
    (folder / "big.tif").symlink_to(tiled)  # 1000 x 1000
    (folder / "naip.tif").symlink_to(naip)  # 934 x 723
    (folder / "sub").mkdir()
    derive_raster(tiled, folder / "sub" / "mid.tif", window=Window(200, 100, 600, 500))
    derive_raster(naip, folder / "small.tif", window=Window(100, 100, 300, 200), bands=[1, 2, 3])
    (folder / "broken.tif").write_text("not a raster")
    return folder


@pytest.fixture(scope="module")
def reference(folder, model, tmp_path_factory) -> Path:
    """The folder through one in-process `casd batch`."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["batch", str(folder), "-o", str(out), "-m", str(model), *FAST]) == 1  # broken.tif
    return out


def layer(path: Path) -> tuple[list[bytes], dict[str, np.ndarray]]:
    meta, fids, geometry, values = pyogrio.raw.read(path, layer=path.stem, return_fids=True)
    return list(geometry), {"fid": fids, **dict(zip(meta["fields"], values))}


def assert_same_layers(ours: Path, theirs: Path) -> None:
    """Same features in the same order: fids, every attribute, every geometry."""
    geometry, fields = layer(ours)
    expected_geometry, expected_fields = layer(theirs)
    assert len(geometry) > 0 and geometry == expected_geometry, ours.name
    assert fields.keys() == expected_fields.keys()
    for name, values in fields.items():
        assert np.array_equal(values, expected_fields[name]), (ours.name, name)


def outputs(out: Path) -> list[str]:
    """Every file under ``out``, hidden ones (partials) included."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_two_ranks_write_what_one_process_writes(folder, model, reference, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*TORCHRUN, "batch", str(folder), "-o", str(out), "-m", str(model), *FAST],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]  # broken.tif failed, the rest went on
    assert "4 done" in done.stdout and "1 failed" in done.stdout
    assert outputs(out) == outputs(reference) == [
        "big.gpkg", "naip.gpkg", "small.gpkg", "sub/mid.gpkg", "summary.json"]
    for name in outputs(out)[:-1]:
        assert_same_layers(out / name, reference / name)

    summary = json.loads((out / "summary.json").read_text())
    single = json.loads((reference / "summary.json").read_text())
    names = ["big.tif", "broken.tif", "naip.tif", "small.tif", "sub/mid.tif"]
    assert [r["raster"] for r in summary["rasters"]] == [r["raster"] for r in single["rasters"]] == names
    assert summary["world_size"] == 2 and single["world_size"] == 1
    assert {r["rank"] for r in single["rasters"]} == {0}
    status = {r["raster"]: r["status"] for r in summary["rasters"]}
    assert status == {r["raster"]: r["status"] for r in single["rasters"]}
    assert status["broken.tif"] == "failed" and list(status.values()).count("done") == 4
    # shared out by pixels (largest first onto the least loaded), not by file count
    pixels = [r["pixels"] for r in summary["rasters"]]
    assert pixels == [1_000_000, 0, 934 * 723, 300 * 200, 600 * 500]
    ranks = [r["rank"] for r in summary["rasters"]]
    assert ranks == share_by_pixels(pixels, 2) == [0, 0, 1, 1, 1]
    for ours, theirs in zip(summary["rasters"], single["rasters"]):
        for key in ("tiles", "labelled", "skipped_nodata", "features"):
            assert ours[key] == theirs[key]


def _workers(parent: int) -> dict[int, int]:
    """{local rank: pid} of the processes torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if int(fields[1]) == parent:
            for item in environ:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(entry.name)
    return found


def test_killed_rank_then_rerun_completes_without_duplicates(folder, model, reference, tmp_path):
    out = tmp_path / "out"
    argv = [*TORCHRUN, "batch", str(folder), "-o", str(out), "-m", str(model), *FAST]
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in out.rglob("*.gpkg") if not p.name.startswith(".")]:
            assert job.poll() is None and time.monotonic() < deadline, "no rank produced an output"
            time.sleep(0.05)
        workers = _workers(job.pid)
        os.kill(workers[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0  # torchrun stops the other rank and fails
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    before = [name for name in outputs(out) if not Path(name).name.startswith(".")]
    assert 1 <= len(before) < 4 and "summary.json" not in before  # killed mid-way

    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert outputs(out) == outputs(reference)  # no partial file left, none twice
    for name in outputs(out)[:-1]:
        assert_same_layers(out / name, reference / name)
    summary = json.loads((out / "summary.json").read_text())
    status = {r["raster"]: r["status"] for r in summary["rasters"]}
    assert sorted(n for n, s in status.items() if s == "skipped") == sorted(
        str(Path(name).with_suffix(".tif")) for name in before)
    redone = [r for r in summary["rasters"] if r["status"] != "skipped"]
    assert [r["rank"] for r in redone] == share_by_pixels([r["pixels"] for r in redone], 2)


def test_one_raster_split_by_rows_equals_one_process(rasters, model, tmp_path):
    """`casd predict` under torchrun: each rank a block of rows, rank 0 writes one layer."""
    raster = rasters / NAIP
    one, two = tmp_path / "one.gpkg", tmp_path / "two.gpkg"
    args = ["-m", str(model), "--tile-size", "64", "--unit", "px", "--overlap", "0.25", "--quiet"]
    assert main(["predict", str(raster), "-o", str(one), *args]) == 0
    done = subprocess.run([*TORCHRUN, "predict", str(raster), "-o", str(two), *args],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gpkg", "two.gpkg"]
    assert done.stdout.count("wrote") == 1 and "from 300 tile(s)" in done.stdout  # rank 0 reports all
    assert_same_layers(two, one)
