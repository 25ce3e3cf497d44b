"""``make_chips``: labelled polygons over rasters → a chip folder ``casd train`` trains on."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS

from casd_core.chips.config import ChipConfig, ChipSummary, ClassChips
from casd_core.chips.grid import Candidate, find_candidates
from casd_core.chips.labels import Labels, class_text, folder_names, read_labels
from casd_core.chips.split import block_groups, group_split, polygon_groups
from casd_core.chips.write import (INDEX_NAME, SPLIT_NAME, clear_previous, nodata_fraction, write_chip,
                                   write_classes, write_index, write_split)
from casd_core.errors import CasdError, param
from casd_core.progress import Monitor
from casd_core.style import CLASSES_FILE, class_colors_for, normalized_color
from casd_core.tiling import pixel_size_m, resolve_tile_size, tile_grid, window_polygon

FALLBACK_TILE = (224.0, "px")  # when there is no model to take a footprint from


def make_chips(rasters: Sequence[str | os.PathLike], labels: str | os.PathLike, class_field: str,
               out_dir: str | os.PathLike, config: ChipConfig | None = None,
               monitor: Monitor | None = None) -> ChipSummary:
    """Cut training chips from ``rasters`` where the polygons of ``labels`` say what they show.

    Writes ``out_dir/<class folder>/<raster stem>_<row>_<col>.tif`` (georeferenced, every band
    in the source dtype), ``out_dir/chips.gpkg`` (each chip's footprint, class, split, group,
    polygon and coverage; in the rasters' CRS, or EPSG:4326 when they differ) and
    ``out_dir/split.csv`` (``path,label,split,group``, a spatial train/test split; see
    :mod:`casd_core.chips.split`), and with ``config.class_colors`` ``out_dir/classes.json``
    (each class's colour, which the index is styled with and a model trained on the chips
    keeps). ``out_dir`` must be empty unless ``config.overwrite``.
    A cancel or an error removes the chips this call wrote. Raises :class:`CasdError` for bad
    input and when no chip at all could be made.
    """
    started = time.perf_counter()
    config = config or ChipConfig()
    monitor = monitor or Monitor()
    config.validate()
    out_dir = Path(out_dir)
    paths = _check_rasters(rasters)
    if not class_field:
        raise CasdError(f"no {param('class_field')} given; name the field that holds the class")
    labelled = read_labels(labels, class_field)
    if labelled.crs is None:
        monitor.warn(f"the {param('labels')} file {labelled.path.name} has no CRS; its coordinates are "
                     "taken to be in each raster's CRS")
    size, unit = _tile_size(config)
    tiling = config.tiling(size, unit)
    grids = [tile_grid(path, tiling) for path in paths]  # a tile larger than a raster fails here
    created = _check_out_dir(out_dir, config.overwrite)
    class_names = labelled.class_names
    folders = folder_names(class_names)
    stems = _stems(paths)

    chips: list[tuple[int, Candidate, float]] = []  # (raster index, candidate, nodata fraction)
    crss, block_units = [], []
    seen = np.zeros(len(labelled.ids), dtype=bool)
    mixed = low = nodata = 0
    written: list[Path] = []
    try:
        for k, path in enumerate(paths):
            part = monitor.part(k / len(paths), 1 / len(paths), path.name)
            with rasterio.open(path) as dataset:
                grid = grids[k]
                crss.append(dataset.crs)
                block_units.append(_block_units(dataset, config.block_size)
                                   if config.split_by == "block" else None)
                geometries = labelled.in_crs(dataset.crs)
                box = window_polygon(dataset.transform, rasterio.windows.Window(0, 0, dataset.width,
                                                                                dataset.height))
                found = find_candidates(grid, geometries, labelled.classes, box, config.min_coverage,
                                        config.max_other_coverage)
                seen |= found.overlapping
                mixed, low = mixed + found.mixed, low + found.low_coverage
                total = len(found.candidates)
                part.report("chips", 0, total, item=path.name)
                for done, candidate in enumerate(found.candidates, start=1):
                    part.check_cancelled()
                    fraction = nodata_fraction(dataset, candidate.window)
                    if fraction > config.nodata_threshold:
                        nodata += 1
                    else:
                        target = out_dir / _chip_path(folders[candidate.label], stems[k], candidate)
                        write_chip(dataset, candidate.window, target)
                        written.append(target)
                        chips.append((k, candidate, fraction))
                    part.report("chips", done, total, item=path.name)
        if not chips:
            raise CasdError(_nothing_usable(labelled, seen, mixed, low, nodata))
        summary = _finish(out_dir, paths, stems, labelled, folders, chips, crss, block_units, config,
                          f"{size:g} {unit}")
    except BaseException:
        _remove_written(written, out_dir)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty
        raise
    summary.polygons_outside = labelled.ids[~seen].tolist()
    outside = set(summary.polygons_outside)
    summary.polygons_without_chips = [i for i in summary.polygons_without_chips if i not in outside]
    summary.dropped_mixed, summary.dropped_low_coverage, summary.skipped_nodata = mixed, low, nodata
    summary.seconds = time.perf_counter() - started
    return summary


def _finish(out_dir: Path, paths: list[Path], stems: list[str], labelled: Labels, folders: dict[str, str],
            chips: list, crss: list, block_units: list, config: ChipConfig, tile: str) -> ChipSummary:
    """The split, ``split.csv`` and ``chips.gpkg`` for the chips written, and the summary."""
    chips = sorted(chips, key=lambda item: (folders[item[1].label], item[0], item[1].row, item[1].col))
    labels = [c.label for _, c, _ in chips]
    distinct = list(dict.fromkeys(c.to_wkt() for c in crss))
    if config.split_by == "polygon":
        by_crs = [[i for i, (k, _, _) in enumerate(chips) if crss[k].to_wkt() == wkt] for wkt in distinct]
        groups = polygon_groups(labels, [c.polygons for _, c, _ in chips], by_crs,
                                [c.footprint for _, c, _ in chips], labelled.ids)
    else:
        tags = [f"{distinct.index(crss[k].to_wkt())}:" if len(distinct) > 1 else "" for k, _, _ in chips]
        centres = [c.footprint.centroid.coords[0] for _, c, _ in chips]
        groups = block_groups(centres, [block_units[k] for k, _, _ in chips], tags)
    _, test = group_split(labels, groups, config.test_fraction, config.seed)
    split = ["train"] * len(chips)
    for i in test:
        split[i] = "test"

    rows, records = [], []
    for i, (k, c, fraction) in enumerate(chips):
        rel = _chip_path(folders[c.label], stems[k], c)
        rows.append((rel, c.label, split[i], groups[i]))
        records.append({"path": rel, "class_name": c.label, "split": split[i], "group": groups[i],
                        "polygon_id": int(labelled.ids[c.polygon]), "coverage": c.coverage,
                        "nodata_fraction": fraction, "raster": str(paths[k].resolve()), "row": c.row, "col": c.col})
    same_crs = all(c == crss[0] for c in crss)
    index_crs = crss[0] if same_crs else CRS.from_epsg(4326)
    footprints = [c.footprint if same_crs else _to_crs(c.footprint, crss[k], index_crs) for k, c, _ in chips]
    settings = {**asdict(config), "tile": tile, "rasters": [str(p) for p in paths], "labels": str(labelled.path)}
    names = sorted(set(labels))
    analyst = {class_text(name): normalized_color(color) for name, color in (config.class_colors or {}).items()}
    colors = class_colors_for(names, analyst)
    if analyst.keys() & set(names):  # the analyst's colours, for the model trained on these chips
        write_classes(names, colors, folders, out_dir / CLASSES_FILE)
    write_index(records, footprints, out_dir / INDEX_NAME, index_crs, names, colors, settings)
    write_split(rows, out_dir / SPLIT_NAME)

    classes = {name: ClassChips(folders[name]) for name in names}
    for label, s in zip(labels, split):
        setattr(classes[label], s, getattr(classes[label], s) + 1)
    for name in classes:
        classes[name].polygons = len({p for _, c, _ in chips if c.label == name for p in c.polygons})
        classes[name].groups = len({g for g, label in zip(groups, labels) if label == name})
    polygons_with_chips = {int(labelled.ids[p]) for _, c, _ in chips for p in c.polygons}
    too_few = {}
    for name in labelled.class_names:
        c = classes.get(name)
        if c is None:
            too_few[name] = "no chip (polygons outside the rasters, smaller than a tile or all left out)"
            continue
        reasons = []
        if c.chips < config.min_chips:
            reasons.append(f"{c.chips} chip(s), fewer than {config.min_chips} ({param('min_chips')})")
        if c.groups < 2:
            remedy = ("draw another polygon elsewhere" if config.split_by == "polygon"
                      else f"use a smaller {param('block_size')}")
            reasons.append(f"one {config.split_by} group only, so no spatial test split; {remedy}")
        if reasons:
            too_few[name] = "; ".join(reasons)
    return ChipSummary(
        out_dir=out_dir, index=out_dir / INDEX_NAME, split_csv=out_dir / SPLIT_NAME,
        index_crs=index_crs.to_string(), tile=tile, split_by=config.split_by, classes=classes,
        polygons=len(labelled.ids),
        polygons_without_chips=[int(i) for i in labelled.ids if int(i) not in polygons_with_chips],
        labels_skipped=dict(labelled.skipped), too_few=too_few,
        settings={k: getattr(config, k) for k in ("min_coverage", "max_other_coverage", "nodata_threshold")})


def _check_rasters(rasters: Sequence[str | os.PathLike]) -> list[Path]:
    if not rasters:
        raise CasdError(f"no {param('rasters')} given; pass one or more georeferenced rasters")
    paths = list(dict.fromkeys(Path(r) for r in rasters))
    first = None
    for path in paths:
        if not path.is_file():
            raise CasdError(f"{param('rasters')} {path} does not exist; check the path")
        try:
            with rasterio.open(path) as dataset:
                crs, bands = dataset.crs, (dataset.count, dataset.dtypes[0])
        except rasterio.errors.RasterioIOError:
            raise CasdError(f"{param('rasters')} {path.name} is not a raster GDAL can read; pass "
                            "GeoTIFFs (or another raster format GDAL reads)") from None
        if crs is None:
            raise CasdError(f"{param('rasters')} {path.name} has no coordinate reference system; "
                            "assign one (e.g. `gdal_edit.py -a_srs EPSG:<code>`) and run again")
        first = first or (path, bands)
        if bands != first[1]:  # one chip folder trains one model: one band layout
            raise CasdError(f"{param('rasters')} {path.name} has {bands[0]} {bands[1]} band(s), "
                            f"{first[0].name} {first[1][0]} {first[1][1]}; chips of one folder train one "
                            "model, so give rasters with the same bands (or run once per kind)")
    return paths


def _check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Refuse a non-empty folder unless ``overwrite`` (then clear it); True when created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CasdError(f"{param('out_dir')} {out_dir} is a file; give a folder for the chips")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise CasdError(f"{param('out_dir')} {out_dir} is not empty; choose a new folder, or pass "
                            f"{param('overwrite')} to replace the chips an earlier run wrote there")
        clear_previous(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


def _tile_size(config: ChipConfig) -> tuple[float, str]:
    """The user's tile size, else the model's recommended footprint, else 224 px."""
    if config.tile_size is not None:
        return float(config.tile_size), config.unit
    from casd_core.package import ModelPackage, default_model_path

    model = Path(config.model) if config.model is not None else default_model_path()
    if config.model is None and not model.is_file():
        return FALLBACK_TILE
    return resolve_tile_size(config.tiling(), ModelPackage.load(model))


def _block_units(dataset: rasterio.io.DatasetReader, block_m: float) -> tuple[float, float]:
    """A block of ``block_m`` metres in the raster's CRS units (x, y)."""
    ground = pixel_size_m(dataset.crs, dataset.transform, dataset.width, dataset.height)
    if ground is None:
        raise CasdError(f"the CRS of {Path(dataset.name).name} has no known ground unit, so blocks of "
                        f"{param('block_size')} metres cannot be laid out; split by polygon instead")
    sx, sy = abs(dataset.transform.a), abs(dataset.transform.e)
    return block_m * sx / ground[0], block_m * sy / ground[1]


def _stems(paths: list[Path]) -> list[str]:
    """A safe, distinct name per raster for its chips' file names (``x``, ``x-2``, …)."""
    taken: Counter = Counter()
    stems = []
    for path in paths:
        stem = re.sub(r"[^\w.-]+", "_", path.stem).strip("._") or "raster"
        taken[stem.lower()] += 1
        stems.append(stem if taken[stem.lower()] == 1 else f"{stem}-{taken[stem.lower()]}")
    return stems


def _chip_path(folder: str, stem: str, candidate: Candidate) -> str:
    return f"{folder}/{stem}_{candidate.row}_{candidate.col}.tif"


def _to_crs(geometry, source, target):
    from rasterio.warp import transform_geom

    dense = shapely.segmentize(geometry, max(geometry.length / 40, 1e-9))
    return shapely.geometry.shape(transform_geom(source, target, shapely.geometry.mapping(dense)))


def _remove_written(written: list[Path], out_dir: Path) -> None:
    for path in written:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for folder in {p.parent for p in written}:
        with contextlib.suppress(OSError):
            folder.rmdir()
    for name in (CLASSES_FILE, INDEX_NAME, SPLIT_NAME):  # written last: present only when the run got there
        if written:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()


def _nothing_usable(labelled: Labels, seen: np.ndarray, mixed: int, low: int, nodata: int) -> str:
    if not seen.any():
        return (f"none of the {len(labelled.ids)} polygon(s) of {param('labels')} {labelled.path.name} "
                "overlaps a raster; check that they cover the rasters and that the file's CRS is right")
    return (f"no chip could be made: {mixed} mixed-class, {low} below the {param('min_coverage')}, "
            f"{nodata} over the {param('nodata_threshold')}; use a smaller {param('tile_size')} or "
            "larger polygons")
