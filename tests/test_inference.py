"""Predictor, pipeline and batch runs on the real rasters (a small untrained-head model)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from casd_core import runtime
from casd_core.errors import Cancelled, CasdError
from casd_core.inference import (InferenceConfig, Predictor, TileReader, classify_folder,
                                 classify_raster, iter_tile_predictions, plan_raster)
from casd_core.progress import Monitor
from casd_core.tiling import TilingConfig
from casd_core.vectorio import OUTPUT_FIELDS
from helpers import AID_CLASSES, NAIP, build_test_package, derive_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def package_path(tmp_path_factory) -> Path:
    return build_test_package(tmp_path_factory.mktemp("pkg") / "aid_test.safetensors")


@pytest.fixture(scope="session")
def predictor(package_path) -> Predictor:
    return Predictor.from_package(package_path, device="cpu")


@pytest.fixture(scope="module")
def naip(rasters) -> Path:
    return rasters / NAIP


@pytest.fixture(scope="module")
def naip_collar(naip, tmp_path_factory) -> Path:
    """The NAIP tile with its 374 westernmost columns set to its nodata value 0 (a collar)."""
    def blank_west(data):
        data[:, :, :374] = 0
        return data
    return derive_raster(naip, tmp_path_factory.mktemp("collar") / "naip_collar.tif", edit=blank_west)


def test_predictor_outputs_probabilities(predictor, package_path):
    assert runtime.tune_malloc() is True  # glibc on the project's Linux machines
    raw = np.random.default_rng(0).integers(0, 256, (5, 3, 64, 64), dtype=np.uint8)
    probs = predictor.predict_raw(raw)
    assert probs.shape == (5, 30) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    # predict() takes model units: the package's scale, mean and std
    package = predictor.package
    x = torch.from_numpy(raw).float() / package.value_scale
    x = (x - torch.tensor(package.mean).view(1, 3, 1, 1)) / torch.tensor(package.std).view(1, 3, 1, 1)
    torch.testing.assert_close(predictor.predict(x), probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predictor.preprocess(raw), x, atol=1e-5, rtol=1e-5)
    # the pipeline's split: host-side staging on a reader thread, then the model
    torch.testing.assert_close(predictor.stage(raw), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predictor.predict_staged(predictor.stage(raw)), probs, atol=1e-5, rtol=1e-4)
    assert predictor.name == "aid_test" and torch.get_num_threads() <= runtime.cpu_threads()


def test_predict_raw_leaves_a_float_tile_as_it_was(predictor, naip):
    # A float32 array is the buffer torch works in; normalising it in place once made every
    # later call on the same tile classify other values.
    with rasterio.open(naip) as ds:
        tile = ds.read((1, 2, 3), window=((0, 64), (0, 64))).astype(np.float32)[None]
    for raw in (tile, torch.from_numpy(tile.copy())):
        before = np.array(raw, copy=True)
        first = predictor.predict_raw(raw)
        assert np.array_equal(np.asarray(raw), before)
        torch.testing.assert_close(predictor.predict_raw(raw), first, atol=0, rtol=0)


def test_device_errors():
    with pytest.raises(CasdError, match="not a device"):
        runtime.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CasdError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")
        assert runtime.resolve_device("auto").type in ("cpu", "mps")


def test_classify_raster_writes_one_feature_per_tile(rasters, predictor, tmp_path):
    import pyogrio

    out = tmp_path / "tiled.gpkg"
    summary = classify_raster(rasters / "test_tiled.tif", out, predictor,
                              TilingConfig(tile_size=60, unit="m"), InferenceConfig(batch_size=8))
    assert summary.tiles == summary.labelled == summary.features == 25
    assert sum(summary.class_counts.values()) == 25
    info = pyogrio.read_info(out, layer="tiled")
    assert info["crs"] == "EPSG:28992" and info["features"] == 25
    assert list(info["fields"]) == [name for name, _ in OUTPUT_FIELDS]
    _, _, _, values = pyogrio.raw.read(out, layer="tiled")
    fields = dict(zip([name for name, _ in OUTPUT_FIELDS], values))
    assert set(fields["class_name"]) <= set(AID_CLASSES) and (fields["score"] > 0).all()
    assert sorted(zip(fields["row"], fields["col"])) == [(r, c) for r in range(5) for c in range(5)]
    assert set(fields["model"]) == {"aid_test"} and (fields["nodata_fraction"] == 0).all()
    assert [p.name for p in tmp_path.iterdir()] == ["tiled.gpkg"]  # no partial file left


def test_pipeline_matches_naive_reads(naip, predictor):
    """Reader threads, batching and nodata bookkeeping change nothing: same tiles, same
    probabilities as reading and classifying each tile alone."""
    tiling = TilingConfig(tile_size=800, unit="m", overlap=0.25)
    threaded = list(iter_tile_predictions(naip, predictor, tiling, InferenceConfig(batch_size=4, workers=2)))
    inline = list(iter_tile_predictions(naip, predictor, tiling, InferenceConfig(batch_size=7, workers=0)))
    assert [(p.row, p.col) for p in threaded] == [(p.row, p.col) for p in inline]
    plan = plan_raster(naip, predictor.package, tiling)
    assert plan.bands == (1, 2, 3) and plan.out_shape == (64, 64)
    with rasterio.open(naip) as ds:
        for a, b in zip(threaded[::5], inline[::5]):
            assert a.class_name == b.class_name
            assert a.score == pytest.approx(b.score, abs=1e-4)
            raw = ds.read([1, 2, 3], window=a.window, out_shape=(3, 64, 64),
                          resampling=plan.resampling)
            alone = predictor.predict_raw(raw[None])[0]
            assert a.score == pytest.approx(float(alone.max()), abs=1e-4)
            assert a.top1_class == a.class_name == AID_CLASSES[int(alone.argmax())]
            assert a.geometry.bounds == ds.window_bounds(a.window)
    p = threaded[0]
    assert p.top1_prob >= p.top2_prob >= p.top3_prob
    assert p.margin == pytest.approx(p.top1_prob - p.top2_prob)
    assert 0.0 <= p.entropy <= 1.0


@pytest.mark.parametrize("name, tiling", [
    ("test_tiled.tif", TilingConfig(tile_size=64, unit="px", overlap=0.25)),  # JPEG, 1:1 strips
    (NAIP, TilingConfig(tile_size=64, unit="px", stride=80)),  # gaps between tiles
    (NAIP, TilingConfig(tile_size=300, unit="m")),  # 60 px resampled to 64, one by one
])
def test_batched_reads_equal_single_window_reads(rasters, predictor, name, tiling):
    plan = plan_raster(rasters / name, predictor.package, tiling)
    tiles = list(plan.grid)[:40]
    reader = TileReader(plan)
    raw, fractions = reader.read(tiles)
    reader.close()
    assert raw.shape == (len(tiles), 3, 64, 64) and not fractions.any()
    with rasterio.open(rasters / name) as ds:
        for tile, got in zip(tiles, raw):
            expected = ds.read([1, 2, 3], window=tile.window, out_shape=(3, 64, 64),
                               resampling=plan.resampling)
            np.testing.assert_array_equal(got, expected)


def test_thread_tuner_follows_the_faster_setting(monkeypatch):
    calls = [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1])
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = runtime.ThreadTuner(period=12, probe=2)
    def run(seconds: dict[int, float], batches: int) -> list[int]:
        used = []
        for _ in range(batches):
            used.append(tuner.current)
            tuner.record(32, seconds[used[-1]])
        return used

    used = run({2: 1.0, 1: 3.0}, 60)  # idle machine: the team of 2 is 3x faster
    assert used.count(2) >= 0.8 * len(used) and calls.count(1) >= 3  # probes 1 now and then
    used = run({2: 5.0, 1: 2.0}, 60)  # another process took a core: one thread is faster
    assert used[-50:].count(1) >= 0.8 * 50
    tuner.restore()
    assert calls[-1] == 2
    assert runtime.ThreadTuner(enabled=False).options == [2]


def test_reads_are_bounded_and_overlapped(naip, predictor, monkeypatch):
    """At most workers + 1 batches are read ahead of the model."""
    reads, consumed, ahead = [], [0], []
    original = TileReader.read

    def counting_read(self, tiles):
        reads.append(len(tiles))
        ahead.append(len(reads) - consumed[0])
        return original(self, tiles)

    monkeypatch.setattr(TileReader, "read", counting_read)
    stream = iter_tile_predictions(naip, predictor, TilingConfig(tile_size=400, unit="m"),
                                   InferenceConfig(batch_size=4, workers=1))
    for i, _ in enumerate(stream, 1):
        consumed[0] = (i + 3) // 4
    assert sum(reads) == stream.total and max(ahead) <= 2 + 1


def test_nodata_tiles_are_skipped(naip_collar, predictor):
    # 120 px (600 m) tiles: columns 0, 120, 240 lie in the blanked west; 360 is 14/120 blank
    stream = iter_tile_predictions(naip_collar, predictor, TilingConfig(tile_size=600, unit="m"),
                                   InferenceConfig(batch_size=16))
    predictions = list(stream)
    grid = stream.plan.grid
    assert grid.shape == (7, 8)
    assert stream.skipped_nodata == 3 * 7
    assert stream.labelled == len(predictions) == 5 * 7
    for p in predictions:
        expected = max(0, 374 - p.window.col_off) / 120
        assert p.nodata_fraction == pytest.approx(min(expected, 1.0), abs=0.02)
        assert p.window.col_off >= 360
    # a threshold of 1 labels every tile that has any data; 0 keeps only clean tiles
    strict = list(iter_tile_predictions(naip_collar, predictor,
                                        TilingConfig(tile_size=600, unit="m", nodata_threshold=0.0)))
    assert all(p.nodata_fraction == 0 for p in strict) and len(strict) == 4 * 7


def test_real_naip_has_no_nodata_pixels(naip, predictor):
    stream = iter_tile_predictions(naip, predictor, TilingConfig(tile_size=1200, unit="m"))
    predictions = list(stream)
    assert stream.skipped_nodata == 0 and all(p.nodata_fraction == 0 for p in predictions)
    assert stream.plan.mask_mode == "nodata"


def test_band_mapping_on_naip(naip, predictor, tmp_path):
    package = predictor.package
    tiling = TilingConfig(tile_size=1200, unit="m", bands=(4, 1, 2))
    plan = plan_raster(naip, package, tiling)
    assert plan.bands == (4, 1, 2)
    tile = next(iter(plan.grid))
    raw, fractions = TileReader(plan).read([tile])
    with rasterio.open(naip) as ds:
        expected = ds.read([4, 1, 2], window=tile.window, out_shape=(3, 64, 64),
                           resampling=plan.resampling)
    np.testing.assert_array_equal(raw[0], expected)
    # NIR first, then red and green: different input, different probabilities
    a = next(iter(iter_tile_predictions(naip, predictor, tiling)))
    b = next(iter(iter_tile_predictions(naip, predictor, TilingConfig(tile_size=1200, unit="m"))))
    assert (a.row, a.col) == (b.row, b.col) and a.score != b.score
    with pytest.raises(CasdError, match="band 5 does not exist"):
        plan_raster(naip, package, TilingConfig(tile_size=1200, unit="m", bands=(5, 1, 2)))
    with pytest.raises(CasdError, match="expects 3"):
        plan_raster(naip, package, TilingConfig(tile_size=1200, unit="m", bands=(1, 2)))
    # colour interpretation wins over band order when it names the model's bands
    bgr = derive_raster(naip, tmp_path / "bgr.tif", bands=[3, 2, 1], photometric="rgb")
    with rasterio.open(bgr, "r+") as ds:
        ds.colorinterp = [rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.green,
                          rasterio.enums.ColorInterp.red]
    assert plan_raster(bgr, package, TilingConfig(tile_size=1200, unit="m")).bands == (3, 2, 1)


def test_cancel_leaves_no_output(rasters, predictor, tmp_path):
    calls = []
    monitor = Monitor(on_progress=calls.append, is_cancelled=lambda: len(calls) > 1)
    out = tmp_path / "cancelled.gpkg"
    with pytest.raises(Cancelled):
        classify_raster(rasters / "test_tiled.tif", out, predictor,
                        TilingConfig(tile_size=30, unit="m"), InferenceConfig(batch_size=4),
                        monitor=monitor)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_model_stops_the_reader_threads_before_the_raster_closes(rasters, predictor, monkeypatch):
    """An error from the model mid-stream (e.g. an ONNX graph refusing the tile size) joins the
    reader threads at once, not when the stream is collected: a thread still reading a closed
    GDAL dataset crashes the process, QGIS with it."""
    predicted = []

    def failing(staged, tta=False):
        predicted.append(len(staged))
        if len(predicted) > 1:
            raise CasdError("the model failed")
        return real(staged, tta)

    real = predictor.predict_staged
    monkeypatch.setattr(predictor, "predict_staged", failing)
    stream = iter_tile_predictions(rasters / "test_tiled.tif", predictor, TilingConfig(tile_size=30, unit="m"),
                                   InferenceConfig(batch_size=4, workers=2))
    with pytest.raises(CasdError, match="the model failed") as failed:
        list(stream)
    assert failed.traceback  # held: it keeps the stream's frames, and so its generators, alive
    assert not [t for t in threading.enumerate() if t.name.startswith("casd-read")]


@pytest.fixture()
def batch_folder(rasters, tmp_path, naip) -> Path:
    """Real rasters (linked, not copied) in nested folders, plus one broken file."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_tiled.tif").symlink_to(rasters / "test_tiled.tif")
    (folder / "sub" / "b_naip.TIF").symlink_to(naip)
    (folder / "sub" / "c_tiled.tiff").symlink_to(rasters / "test_tiled.tif")
    (folder / "broken.tif").write_text("not a raster")
    (folder / "notes.txt").write_text("ignored")
    return folder


BATCH_TILING = TilingConfig(tile_size=100, unit="px")  # 9..80 tiles per raster


def test_batch_reports_bad_file_and_goes_on(batch_folder, predictor, tmp_path):
    import pyogrio

    out = tmp_path / "out"
    summary = classify_folder(batch_folder, out, predictor, BATCH_TILING, merged=True)
    status = {r.raster.name: r.status for r in summary.results}
    assert status == {"a_tiled.tif": "done", "b_naip.TIF": "done", "c_tiled.tiff": "done",
                      "broken.tif": "failed"}
    failed = next(r for r in summary.results if r.status == "failed")
    assert "not a raster" in failed.message and "\n" not in failed.message
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert outputs == ["a_tiled.gpkg", "merged.gpkg", "sub/b_naip.gpkg", "sub/c_tiled.gpkg", "summary.json"]
    table = summary.table()
    assert "broken.tif" in table and "3 done" in table and "1 failed" in table
    # merged: every tile of every raster, reprojected to one CRS, with its source
    info = pyogrio.read_info(out / "merged.gpkg", layer="merged")
    assert info["features"] == sum(r.labelled for r in summary.results)
    assert "source" in list(info["fields"]) and info["crs"] == "EPSG:4326"


def test_batch_killed_midway_then_rerun(batch_folder, predictor, tmp_path):
    out = tmp_path / "out"
    finished = []

    def stop_after_first_file(event):
        if event.stage != "tiles":
            return
        if event.done == event.total:
            finished.append(event.item)
        if len(finished) == 1 and event.done < event.total:  # second raster under way: "kill"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        classify_folder(batch_folder, out, predictor, BATCH_TILING,
                        monitor=Monitor(on_progress=stop_after_first_file))
    first = out / "a_tiled.gpkg"
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["a_tiled.gpkg"]
    stamp = first.stat().st_mtime_ns
    # a leftover partial file of a dead writer is swept on the rerun
    stale = out / "sub" / ".b_naip.casd-partial-999999999.gpkg"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    summary = classify_folder(batch_folder, out, predictor, BATCH_TILING)
    status = {r.raster.name: r.status for r in summary.results}
    assert status == {"a_tiled.tif": "skipped", "b_naip.TIF": "done", "c_tiled.tiff": "done",
                      "broken.tif": "failed"}
    assert first.stat().st_mtime_ns == stamp
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert outputs == ["a_tiled.gpkg", "sub/b_naip.gpkg", "sub/c_tiled.gpkg", "summary.json"]
    again = classify_folder(batch_folder, out, predictor, BATCH_TILING, overwrite=True)
    assert [r.status for r in again.results].count("done") == 3


def test_folder_errors(tmp_path, predictor):
    with pytest.raises(CasdError, match="does not exist"):
        classify_folder(tmp_path / "nope", tmp_path / "out", predictor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CasdError, match="no .tif/.tiff raster"):
        classify_folder(tmp_path / "empty", tmp_path / "out", predictor)
