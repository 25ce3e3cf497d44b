"""The tiles worth labelling next: where the model is least sure, spread over the raster.

Active learning's simplest useful form (uncertainty sampling with a spacing rule): rank the
labelled tiles by their top probability (lowest first), take the ``4 N`` least sure as
candidates, and pick from them greedily, least sure first, skipping a candidate closer than
a spacing radius to one already picked, so that N suggestions do not cluster in one
confusing corner; the radius (in grid cells) starts at half the spacing of N tiles spread
evenly over the grid and halves until N are found. The suggestions are written as a layer
with an empty ``class`` field (plus the model's top-3 for reference), ready to be filled in
QGIS and fed to ``casd chips --labels``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from casd_core.errors import CasdError, param
from casd_core.vectorio import FeatureColumns, read_layer, write_layer

SUGGESTION_FIELDS: list[tuple[str, str]] = [
    ("class", "str"),  # to be filled in by the analyst
    ("score", "float64"),
    ("top1_class", "str"),
    ("top2_class", "str"),
    ("top3_class", "str"),
    ("row", "int32"),
    ("col", "int32"),
]


def pick_uncertain(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """Indexes of ``n`` tiles: low scores first, kept apart on the grid (see the module doc)."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    candidates = order[:min(len(order), 4 * n)]
    extent = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    radius = 0.5 * math.sqrt(extent / n)
    while True:
        picked: list[int] = []
        for index in candidates:
            if all((rows[index] - rows[j]) ** 2 + (cols[index] - cols[j]) ** 2 >= radius ** 2 for j in picked):
                picked.append(int(index))
                if len(picked) == n:
                    return np.asarray(picked)
        if radius < 1:  # cannot spread them further apart: the least sure, in order
            return candidates[:n]
        radius /= 2


def write_suggestions(layer: str | os.PathLike, out: str | os.PathLike, n: int) -> int:
    """Write the ``n`` tiles of ``layer`` (a ``casd predict`` tile layer) most worth labelling
    to ``out`` (any supported vector format, atomically); returns how many were written."""
    if n < 1:
        raise CasdError(f"{param('suggest')} {n} must be at least 1")
    geometry, fields, crs = read_layer(layer, ["score", "row", "col", "top1_class"],
                                       optional=("top2_class", "top3_class"),
                                       hint=" (a dissolved layer has no tiles to suggest)")
    picked = pick_uncertain(np.asarray(fields["score"], dtype=float), np.asarray(fields["row"]),
                            np.asarray(fields["col"]), n)
    columns = FeatureColumns(SUGGESTION_FIELDS)
    for i in picked:
        columns.append(bytes(geometry[i]), {
            "class": None, "score": float(fields["score"][i]), "row": int(fields["row"][i]),
            "col": int(fields["col"][i]), "top1_class": fields["top1_class"][i],
            "top2_class": fields.get("top2_class", [None] * len(geometry))[i],
            "top3_class": fields.get("top3_class", [None] * len(geometry))[i]})
    write_layer(columns, Path(out), crs, None, package=None)
    return len(columns)
