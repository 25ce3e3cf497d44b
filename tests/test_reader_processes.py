"""The GPU's feeding path on CPU: tiles read by forked reader processes into shared slots give
the same predictions as the reader threads, values mapped and nodata skipped alike, and a
reader's failure reaches the caller as the thread path's does."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

from casd_core.errors import CasdError
from casd_core.inference import InferenceConfig, Predictor, iter_tile_predictions
from casd_core.inference.reader import ProcessTileReader
from casd_core.tiling import TilingConfig
from helpers import NAIP, build_test_package, derive_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILING = TilingConfig(tile_size=64, unit="px", overlap=0.25)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_package(build_test_package(tmp_path_factory.mktemp("m") / "m.safetensors"), "cpu")


@pytest.fixture(scope="module")
def uint16_with_collar(rasters, tmp_path_factory) -> Path:
    """NAIP's RGB as uint16 ×40 (so values are mapped) with a nodata collar (so some tiles
    are dropped from their batch)."""
    def edit(data: np.ndarray) -> np.ndarray:
        data = data.astype(np.uint16) * 40
        data[:, :, :200] = 0
        return data

    return derive_raster(rasters / NAIP, tmp_path_factory.mktemp("u16") / "u16.tif", bands=[1, 2, 3],
                         edit=edit, dtype="uint16", nodata=0)


def rows(stream) -> list[tuple]:
    return [(p.row, p.col, p.class_name, p.score, p.top2_class, p.nodata_fraction) for p in stream]


@pytest.mark.parametrize("name", ["naip", "uint16 with collar"])
def test_reader_processes_predict_what_threads_predict(rasters, uint16_with_collar, predictor, name):
    raster = rasters / NAIP if name == "naip" else uint16_with_collar
    threads = iter_tile_predictions(raster, predictor, TILING, InferenceConfig(batch_size=12))
    expected = rows(threads)
    processes = iter_tile_predictions(raster, predictor, TILING, InferenceConfig(batch_size=12, reader_processes=2))
    assert rows(processes) == expected and len(expected) > 100
    assert processes.skipped_nodata == threads.skipped_nodata
    if name != "naip":
        assert processes.plan.mapping is not None and processes.skipped_nodata > 0


def test_a_reader_process_failure_reaches_the_caller(rasters, predictor, tmp_path):
    """A file whose tile blocks are cut off after planning fails in the reader process."""
    raster = derive_raster(rasters / "test_tiled.tif", tmp_path / "cut.tif", window=Window(0, 0, 1000, 1000))
    stream = iter_tile_predictions(raster, predictor, TILING, InferenceConfig(batch_size=12, reader_processes=2))
    with open(raster, "r+b") as handle:  # keep the header, lose the pixel data
        handle.truncate(os.path.getsize(raster) // 3)
    with pytest.raises(CasdError, match="the file may be damaged"):
        list(stream)
    assert not readers()  # closed on the error


def readers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("casd-read")]


def test_reader_processes_are_gone_after_a_raster(rasters, predictor):
    assert ProcessTileReader.available()  # Linux forks
    list(iter_tile_predictions(rasters / NAIP, predictor, TILING, InferenceConfig(batch_size=12, reader_processes=2)))
    assert not readers()
