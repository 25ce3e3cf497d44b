"""Pixel values and confidence on real imagery: 16-bit and float copies of a real orthophoto,
black padding without a nodata flag, abstention, smoothing of overlapping windows and TTA.

The bundled model labels ``test_tiled.tif`` (0.25 m, 8-bit) in 60 m tiles (25 tiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.warp import Resampling, reproject

from casd_core.errors import CasdError
from casd_core.inference import InferenceConfig, Predictor, classify_raster, iter_tile_predictions, plan_raster
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.progress import Monitor
from casd_core.style import UNCERTAIN, qml_style
from casd_core.tiling import TilingConfig
from casd_core.vectorio import layer_name_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILES_60M = TilingConfig(tile_size=60, unit="m")


@pytest.fixture(scope="module")
def model() -> Predictor:
    return Predictor.from_package(None, device="cpu")


@pytest.fixture(scope="module")
def original(rasters) -> Path:
    return rasters / "test_tiled.tif"


def copy_with(source: Path, out: Path, transform_values) -> Path:
    with rasterio.open(source) as ds:
        data, profile = ds.read(), ds.profile
    values = transform_values(data)
    profile.update(dtype=values.dtype.name, compress="deflate")
    for key in ("photometric", "jpeg_quality"):
        profile.pop(key, None)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(values)
    return out


@pytest.fixture(scope="module")
def scaled_copies(original, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scaled")
    return {"uint16 x40": copy_with(original, folder / "u16.tif", lambda d: d.astype(np.uint16) * 40),
            "float 0-1": copy_with(original, folder / "f01.tif", lambda d: d.astype(np.float32) / 255)}


def rotated_copy(original: Path, out: Path, upsample: int = 1, jpeg: bool = False) -> tuple[Path, shapely.Polygon]:
    """``original`` warped with a 20° rotation onto a north-up grid (``upsample`` times finer):
    black corners, no nodata flag (as a reprojected orthophoto often is), written with deflate
    or as a tiled YCbCr JPEG. Also returns the image's footprint."""
    with rasterio.open(original) as ds:
        data, profile, t = ds.read(), ds.profile, ds.transform
        cx, cy = t * (ds.width / 2, ds.height / 2)
        rotation = Affine.translation(cx, cy) * Affine.rotation(20) * Affine.translation(-cx, -cy)
        size, pixel = 1300 * upsample, t.a / upsample
        grid = Affine.translation(cx - size / 2 * pixel, cy + size / 2 * pixel) * Affine.scale(pixel, -pixel)
        warped = np.zeros((3, size, size), dtype=np.uint8)
        reproject(data, warped, src_transform=rotation * t, src_crs=ds.crs, dst_transform=grid,
                  dst_crs=ds.crs, resampling=Resampling.bilinear)
        corners = [rotation * t * xy for xy in ((0, 0), (ds.width, 0), (ds.width, ds.height), (0, ds.height))]
    for key in ("photometric", "jpeg_quality", "nodata"):
        profile.pop(key, None)
    profile.update(width=size, height=size, transform=grid, compress="deflate")
    if jpeg:
        profile.update(compress="jpeg", photometric="ycbcr", jpeg_quality=90, tiled=True,
                       blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(warped)
    return out, shapely.Polygon(corners)


@pytest.fixture(scope="module")
def padded(original, tmp_path_factory) -> tuple[Path, shapely.Polygon]:
    return rotated_copy(original, tmp_path_factory.mktemp("padded") / "rotated.tif")


def read_layer(path: Path) -> dict:
    """The layer's columns by name, plus ``geometry`` (shapely), without geopandas."""
    meta, _, geometry, columns = pyogrio.raw.read(path, layer=layer_name_for(path))
    table = dict(zip(meta["fields"], columns))
    table["geometry"] = shapely.from_wkb(geometry)
    return table


def labels(path: Path) -> dict[tuple[int, int], str]:
    table = read_layer(path)
    return dict(zip(zip(table["row"], table["col"]), table["class_name"]))


def test_scaled_copies_label_like_the_original(model, original, scaled_copies, tmp_path):
    reference = classify_raster(original, tmp_path / "original.gpkg", model, TILES_60M)
    assert reference.values["casd_stretch"].startswith("none")  # the 8-bit original is fed as it is
    expected = labels(tmp_path / "original.gpkg")
    for name, copy in scaled_copies.items():
        warnings = []
        out = tmp_path / f"{copy.stem}.gpkg"
        summary = classify_raster(copy, out, model, TILES_60M, monitor=Monitor(on_warning=warnings.append))
        got = labels(out)
        agreement = np.mean([got[key] == value for key, value in expected.items()])
        assert agreement >= 0.9, f"{name}: {agreement:.0%} of the tiles agree"
        assert len(warnings) == 1 and "auto" in warnings[0]
        assert summary.values["casd_stretch"].startswith("auto")
        assert pyogrio.read_info(out, layer=layer_name_for(out))["layer_metadata"]["casd_stretch"] \
            == summary.values["casd_stretch"]


def test_a_pure_scaling_comes_back_to_the_original_values(model, original, scaled_copies):
    with rasterio.open(original) as ds:
        reference = ds.read(window=((0, 240), (0, 240))).astype(np.float64)
    gains = []
    for copy in scaled_copies.values():
        plan = plan_raster(copy, model.package, TILES_60M)
        with rasterio.open(copy) as ds:
            mapped = plan.mapping.apply(ds.read(window=((0, 240), (0, 240))), band_axis=0)
        unclipped = mapped < plan.mapping.upper
        ratio = mapped[unclipped] / np.maximum(reference[unclipped], 1)
        gains.append(float(np.median(ratio)))
        # one gain for every pixel and band: the original, up to its brightness vs the training set's
        assert np.allclose(mapped[unclipped], reference[unclipped] * gains[-1], atol=0.51 * gains[-1] + 1e-3)
    assert gains[0] == pytest.approx(gains[1], rel=1e-3) and 0.9 < gains[0] < 1.1


def test_the_8bit_original_is_not_remapped(model, original):
    assert plan_raster(original, model.package, TILES_60M).mapping is None
    explicit = plan_raster(original, model.package, TILES_60M, RadiometryConfig(stretch="percentile"))
    assert explicit.mapping is not None and "percentile" in explicit.mapping.description


def test_explicit_value_range_per_band_and_bad_settings(model, scaled_copies):
    copy = scaled_copies["uint16 x40"]
    plan = plan_raster(copy, model.package, TILES_60M,
                       RadiometryConfig(value_range=((0, 0, 0), (10200, 10200, 5100))))
    assert plan.mapping.gain == pytest.approx([255 / 10200, 255 / 10200, 255 / 5100])
    with pytest.raises(CasdError) as raised:
        plan_raster(copy, model.package, TILES_60M, RadiometryConfig(value_range=((0, 0), (1, 1))))
    assert raised.value.params == ["value_range"]
    with pytest.raises(CasdError) as raised:
        plan_raster(copy, model.package, TILES_60M, RadiometryConfig(stretch="gamma"))
    assert raised.value.params == ["stretch"]


def test_black_padding_without_nodata_flag_gets_no_label(model, padded, tmp_path):
    raster, footprint = padded
    with rasterio.open(raster) as ds:
        assert ds.nodata is None
    auto = classify_raster(raster, tmp_path / "auto.gpkg", model, TILES_60M)
    raw = classify_raster(raster, tmp_path / "raw.gpkg", model, TILES_60M,
                          radiometry=RadiometryConfig(auto_nodata=False))
    assert raw.skipped_nodata == 0 and auto.skipped_nodata > 0
    table = read_layer(tmp_path / "raw.gpkg")
    inside = {(r, c): shapely.area(shapely.intersection(g, footprint)) / shapely.area(g)
              for r, c, g in zip(table["row"], table["col"], table["geometry"])}
    with_padding, without = labels(tmp_path / "auto.gpkg"), labels(tmp_path / "raw.gpkg")
    for key, share in inside.items():
        if share < 0.45:  # mostly in the black corners
            assert key not in with_padding, f"tile {key} is {1 - share:.0%} padding but was labelled"
        if share > 0.99:  # interior tiles keep their label
            assert with_padding[key] == without[key]
    assert sum(share > 0.99 for share in inside.values()) >= 4
    assert auto.values["casd_padding"].startswith(("3", "4"))  # ~40 % of the grid is padding


def test_a_big_jpeg_orthophoto_is_planned_from_gdals_implicit_overviews(model, original, tmp_path):
    """Past SAMPLE_PIXELS the plan samples a decimated read; on a JPEG GeoTIFF without
    overviews that is GDAL's DCT-scaled decoding (8x8 block means, ~5x cheaper than decoding
    every pixel: docs/BENCHMARKS.md), which must find the padding and the (absent) mapping that
    exact pixel samples of the same raster find."""
    raster, _ = rotated_copy(original, tmp_path / "big.tif", upsample=2, jpeg=True)
    with rasterio.open(raster) as ds:
        assert ds.width * ds.height > 4 * (1 << 20) and ds.overviews(1) == []
    fast = plan_raster(raster, model.package, TILES_60M)
    exact = plan_raster(raster, model.package, TILES_60M, RadiometryConfig(stretch="percentile"))
    assert fast.mapping is None and exact.mapping is not None  # the explicit stretch still applies
    assert fast.padding is not None and exact.padding is not None
    assert abs(fast.padding.fraction - exact.padding.fraction) < 0.01
    assert 0.3 < fast.padding.fraction < 0.5


def test_a_raster_with_a_nodata_flag_is_not_searched_for_padding(model, rasters):
    naip = rasters / "m_4709963_se_14_1_20200831.tif"
    assert plan_raster(naip, model.package, TilingConfig()).padding is None


def test_unsure_tiles_abstain_but_keep_their_top3(model, original, tmp_path):
    out = tmp_path / "abstain.gpkg"
    summary = classify_raster(original, out, model, TILES_60M, InferenceConfig(min_score=0.6))
    table = read_layer(out)
    unsure = table["score"] < 0.6
    assert unsure.sum() == summary.uncertain > 0
    assert all(name == UNCERTAIN for name in table["class_name"][unsure])
    assert all(name != UNCERTAIN for name in table["class_name"][~unsure])
    assert all(name is not None for name in table["top1_class"])
    meta, _, _, (class_id,) = pyogrio.raw.read(out, layer="abstain", columns=["class_id"],
                                               read_geometry=False, return_fids=False)
    assert np.ma.is_masked(class_id) or np.isnan(class_id.astype(float)[unsure]).all()
    assert f'value="{UNCERTAIN}"' in qml_style(model.package)


def test_smoothing_averages_overlapping_windows_onto_cells(model, original, tmp_path):
    out = tmp_path / "smooth.gpkg"
    tiling = TilingConfig(tile_size=60, unit="m", overlap=0.5)
    classify_raster(original, out, model, tiling, InferenceConfig(smooth=True))
    cells = read_layer(out)["geometry"]
    assert len(cells) == 100  # 8 x 8 windows at half a tile's step cut the raster into 10 x 10 cells
    union = shapely.union_all(cells)
    with rasterio.open(original) as ds:
        assert union.area == pytest.approx(shapely.box(*ds.bounds).area)
    assert shapely.area(cells).sum() == pytest.approx(union.area)  # no two cells overlap


def test_tta_is_invariant_to_rotating_the_tile(model, original):
    with rasterio.open(original) as ds:
        tile = torch.from_numpy(ds.read(window=((0, 224), (0, 224))).astype(np.float32))[None]
    plain = model.predict_raw(tile)
    averaged = model.predict_raw(tile, tta=True)
    rotated = model.predict_raw(torch.rot90(tile, 1, dims=(2, 3)).contiguous(), tta=True)
    assert averaged.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the same 8 views in another order: 6e-8 apart with the default model on this tile, while
    # the average moves a class probability by 0.23 from the plain one
    assert torch.allclose(averaged, rotated, atol=1e-5)
    assert not torch.allclose(plain, averaged, atol=1e-2)


def test_stream_reports_the_mapping_once_before_any_tile(model, scaled_copies):
    warnings, events = [], []
    stream = iter_tile_predictions(scaled_copies["float 0-1"], model, TILES_60M,
                                   monitor=Monitor(on_progress=events.append, on_warning=warnings.append))
    assert len(warnings) == 1 and not events  # decided up front, from one decimated read
    stream.close()
