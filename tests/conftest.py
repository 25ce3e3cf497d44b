"""Shared fixtures: the real data beside the repository (never copied into it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CASD_DATA", REPO.parent / "shared" / "data"))

# The suite must fit 2 CPU cores; more threads than cores only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$CASD_DATA``); its absence is a failure, not a skip."""
    if not (SHARED_DATA / "aid150" / "split_20.csv").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set CASD_DATA to the shared data folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def aid_root(shared_data: Path) -> Path:
    return shared_data / "aid150"


@pytest.fixture(scope="session")
def rasters(shared_data: Path) -> Path:
    return shared_data / "rasters"


@pytest.fixture(scope="session")
def raster_copies(shared_data: Path, tmp_path_factory) -> Path:
    """The shared rasters copied to a temporary folder, for tests that give them to QGIS: a
    QgsRasterLayer computes band statistics for its default contrast stretch, and GDAL saves
    them beside the file (``<raster>.aux.xml``), which must not happen in ../shared/data."""
    folder = tmp_path_factory.mktemp("rasters")
    for path in sorted((shared_data / "rasters").glob("*.tif")):
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """These tests run small batches on 2 cores shared with other jobs: one thread avoids
    OpenMP threads spinning against a busy core (see docs/BENCHMARKS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
