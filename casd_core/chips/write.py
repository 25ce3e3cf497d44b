"""Writing a chip folder: GeoTIFF chips, the ``chips.gpkg`` index, ``split.csv``, the class
colours ``classes.json``, and clearing what an earlier run wrote there.

A chip is a windowed copy of its raster: every band in the source dtype, the window's
transform, the same CRS, nodata value, colour interpretation, band descriptions and (when the
raster has one) its per-dataset mask, deflate-compressed; written to a partial file that is
renamed into place (:func:`casd_core.atomic.atomic_output`), so a chip file is never half
written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from casd_core.atomic import atomic_output, remove_stale_partials, write_text_atomic
from casd_core.style import CLASSES_FILE

INDEX_NAME = "chips.gpkg"
SPLIT_NAME = "split.csv"
SPLIT_COLUMNS = ("path", "label", "split", "group")
INDEX_FIELDS: list[tuple[str, str]] = [
    ("path", "str"),  # relative to the chip folder, as in split.csv
    ("class_name", "str"),  # the field the prediction layers' style categorises on, too
    ("split", "str"),
    ("group", "str"),
    ("polygon_id", "int64"),
    ("coverage", "float64"),
    ("nodata_fraction", "float64"),
    ("raster", "str"),
    ("row", "int32"),
    ("col", "int32"),
]


def nodata_fraction(dataset: Any, window: Window) -> float:
    """Share of the window that the raster's mask (nodata value, alpha, mask band) hides."""
    if all(MaskFlags.all_valid in flags for flags in dataset.mask_flag_enums):
        return 0.0
    mask = dataset.dataset_mask(window=window)
    return 1.0 - np.count_nonzero(mask) / mask.size


def write_chip(dataset: Any, window: Window, path: Path) -> None:
    """Copy ``window`` of ``dataset`` (all bands, source dtype) to the GeoTIFF ``path``."""
    data = dataset.read(window=window)
    integer = np.issubdtype(data.dtype, np.integer)
    profile = {
        "driver": "GTiff", "width": int(window.width), "height": int(window.height),
        "count": dataset.count, "dtype": data.dtype.name, "crs": dataset.crs,
        "transform": dataset.window_transform(window), "nodata": dataset.nodata,
        "compress": "deflate", "predictor": 2 if integer else 3,
    }
    if dataset.count == 3 and data.dtype == np.uint8 and _is_rgb(dataset):
        profile["photometric"] = "rgb"
    flags = dataset.mask_flag_enums[0]
    per_dataset_mask = MaskFlags.per_dataset in flags and MaskFlags.nodata not in flags \
        and MaskFlags.alpha not in flags
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_PAM_ENABLED=False):
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            with contextlib.suppress(Exception):  # a colour interpretation GTiff cannot store
                dst.colorinterp = dataset.colorinterp
            for band, text in enumerate(dataset.descriptions, start=1):
                if text:
                    dst.set_band_description(band, text)
            if per_dataset_mask:
                dst.write_mask(dataset.dataset_mask(window=window))


def _is_rgb(dataset: Any) -> bool:
    from rasterio.enums import ColorInterp

    return tuple(dataset.colorinterp) == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


def write_split(rows: Iterable[Sequence[str]], path: Path) -> None:
    """``split.csv``: ``path,label,split,group`` (``path`` relative to the chip folder, with
    ``/``), the layout :func:`casd_core.data.read_split` reads; ``group`` is the spatial group."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)


def write_index(records: list[dict[str, Any]], footprints: list[Any], path: Path, crs: Any,
                class_names: list[str], class_colors: list[str], settings: dict[str, Any]) -> None:
    """``chips.gpkg``: one footprint per chip, styled by class in QGIS in ``class_colors``."""
    from casd_core.vectorio import FeatureColumns, write_layer

    columns = FeatureColumns(INDEX_FIELDS)
    for footprint, record in zip(footprints, records):
        columns.append(footprint, record)
    style = SimpleNamespace(class_names=class_names, class_colors=class_colors)
    write_layer(columns, path, crs, "gpkg", style,
                metadata={"casd_chips": json.dumps(settings, sort_keys=True, default=str)})


def write_classes(class_names: list[str], class_colors: list[str], folders: dict[str, str], path: Path) -> None:
    """``classes.json``: each class's name, folder and colour (``#rrggbb``), which
    :func:`casd_core.style.training_class_colors` gives the model trained on the chips."""
    classes = [{"name": name, "folder": folders[name], "color": color}
               for name, color in zip(class_names, class_colors)]
    write_text_atomic(json.dumps({"classes": classes}, indent=2, ensure_ascii=False) + "\n", path)


def clear_previous(out_dir: Path) -> int:
    """Remove the chips, index, split and class colours an earlier run wrote into ``out_dir``
    (the chips its ``split.csv`` and ``chips.gpkg`` list, then the class folders left empty),
    and stale partial files. Files the runs did not write stay. Returns the number of files removed."""
    listed: set[Path] = set()
    split = out_dir / SPLIT_NAME
    with contextlib.suppress(OSError, csv.Error, KeyError):
        with split.open(newline="") as handle:
            listed.update(out_dir / row["path"] for row in csv.DictReader(handle))
    index = out_dir / INDEX_NAME
    with contextlib.suppress(Exception):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pyogrio.raw

            _, _, _, data = pyogrio.raw.read(str(index), columns=["path"], read_geometry=False)
        listed.update(out_dir / p for p in data[0] if p)
    removed = remove_stale_partials(out_dir)
    folders = set()
    for file in [*listed, split, index, out_dir / CLASSES_FILE]:
        if file.is_file() and out_dir.resolve() in file.resolve().parents:
            file.unlink()
            folders.add(file.parent)
            removed += 1
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder != out_dir:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    return removed
