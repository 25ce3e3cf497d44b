"""Classify one raster into one output file: the :class:`TilePrediction` stream of
:mod:`casd_core.inference.pipeline` -> vectorio.write_predictions (atomic), and a
:class:`RasterSummary` of what was done.

Predictions are kept as compact columns until the atomic write, so memory stays flat up to
it; on any error or cancel no output file is written. Under ``torchrun``,
:func:`classify_raster_across_ranks` gives each rank a block of grid rows, and rank 0 writes
the whole raster's features in grid order through the same writer.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from casd_core import vectorio
from casd_core.errors import CasdError, param
from casd_core.inference.labels import TilePrediction
from casd_core.inference.pipeline import InferenceConfig, TileStream, iter_tile_predictions
from casd_core.inference.predictor import Predictor
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.inference.raster import RasterPlan
from casd_core.progress import Monitor
from casd_core.tiling import TilingConfig


def describe_values(plan: RasterPlan) -> dict[str, str]:
    """How a raster's values were treated, for the summary and the output layer's metadata."""
    return {"casd_stretch": plan.mapping.description if plan.mapping is not None else "none (raw values)",
            "casd_padding": (f"{plan.padding.fraction:.1%} of the raster (constant "
                             f"{'/'.join(f'{v:g}' for v in plan.padding.values)} at the border)"
                             if plan.padding is not None else "none")}


@dataclass
class RasterSummary:
    """What :func:`classify_raster` did."""

    raster: Path
    output: Path
    tiles: int
    labelled: int
    skipped_nodata: int
    features: int
    seconds: float
    class_counts: dict[str, int] = field(default_factory=dict)
    uncertain: int = 0
    values: dict[str, str] = field(default_factory=dict)  # describe_values()
    plan: RasterPlan | None = None  # what was decided about the raster before reading it

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def nodata_share(self) -> float:
        return self.skipped_nodata / self.tiles if self.tiles else 0.0

    @property
    def uncertain_share(self) -> float:
        return self.uncertain / self.labelled if self.labelled else 0.0


class _Counting:
    """Pass predictions through while counting classes (for the summary)."""

    def __init__(self, stream: TileStream) -> None:
        self.stream = stream
        self.counts: collections.Counter = collections.Counter()

    def __iter__(self) -> Iterator[TilePrediction]:
        for prediction in self.stream:
            self.counts[prediction.class_name] += 1
            yield prediction


def predictor_for(model: Any, device: str) -> Predictor:
    """A loaded :class:`Predictor` as is; a package, a path or ``None`` (the default) loaded."""
    if isinstance(model, Predictor):
        return model
    return Predictor.from_package(model, device)


def classify_raster(raster: str | os.PathLike, output: str | os.PathLike, model: Any = None,
                    tiling: TilingConfig | None = None, inference: InferenceConfig | None = None,
                    fmt: str | None = None, dissolve: bool = False,
                    monitor: Monitor | None = None,
                    radiometry: RadiometryConfig | None = None) -> RasterSummary:
    """Classify every tile of ``raster`` and write the labelled grid to ``output``.

    ``model``: a package path, a :class:`ModelPackage`, a loaded :class:`Predictor`, or
    ``None`` for the embedded default model. The output (format from ``fmt`` or its suffix)
    is replaced atomically; on any error or cancel no output file is written.
    """
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    inference.validate()
    tiling.validate()
    output = Path(output)
    key = vectorio.resolve_format(output, fmt)
    predictor = predictor_for(model, inference.device)
    start = time.perf_counter()
    stream = iter_tile_predictions(raster, predictor, tiling, inference, monitor, radiometry)
    vectorio.check_writable(output)  # after the cheap checks, before the long run
    counting = _Counting(stream)
    values = describe_values(stream.plan)
    try:
        features = vectorio.write_predictions(counting, output, stream.plan.crs, key,
                                              predictor.package, dissolve=dissolve, metadata=values)
    finally:
        stream.close()
    return RasterSummary(raster=Path(raster), output=output, tiles=stream.total,
                         labelled=stream.labelled, skipped_nodata=stream.skipped_nodata,
                         features=features, seconds=time.perf_counter() - start,
                         class_counts=dict(counting.counts.most_common()),
                         uncertain=stream.uncertain, values=values, plan=stream.plan)


def active_process_group() -> Any:
    """:mod:`casd_core.distributed` while a process group of several ranks is active, else
    ``None``; torch is not imported for the answer (the onnxruntime install has none)."""
    if "torch.distributed" not in sys.modules:
        return None
    from casd_core import distributed

    return distributed if distributed.is_distributed() else None


def classify_raster_across_ranks(raster: str | os.PathLike, output: str | os.PathLike, model: Any = None,
                                 tiling: TilingConfig | None = None,
                                 inference: InferenceConfig | None = None, fmt: str | None = None,
                                 dissolve: bool = False, monitor: Monitor | None = None,
                                 radiometry: RadiometryConfig | None = None) -> RasterSummary:
    """:func:`classify_raster` with the raster's grid rows shared out over the ranks of the
    active process group (``torchrun``; without one it is :func:`classify_raster`).

    Every rank calls it with the same arguments and plans the whole raster alike (the same
    grid, bands, value mapping); each classifies one block of rows on its own device and
    sends its features, as compact columns, to rank 0, which writes them in grid order
    through the same writer: the file one process writes. Rank 0 returns the whole summary,
    the others that of their block (``output`` not written by them).
    """
    distributed = active_process_group()
    if distributed is None:
        return classify_raster(raster, output, model, tiling, inference, fmt, dissolve, monitor, radiometry)
    tiling = tiling or TilingConfig()
    inference = inference or InferenceConfig()
    inference.validate()
    tiling.validate()
    if inference.smooth:
        raise CasdError(f"{param('smooth')} averages windows across the row blocks the ranks share, so "
                        "it cannot be split; run it in one process (without torchrun)")
    output = Path(output)
    key = vectorio.resolve_format(output, fmt)
    predictor = predictor_for(model, inference.device)
    start = time.perf_counter()
    rank, ranks = distributed.rank(), distributed.world_size()
    with distributed.patient_group() as group:
        stream = iter_tile_predictions(raster, predictor, tiling, inference, monitor, radiometry,
                                       part=(rank, ranks))
        if rank == 0:
            vectorio.check_writable(output)
        counting = _Counting(stream)
        columns = vectorio.FeatureColumns(vectorio.OUTPUT_FIELDS)
        try:
            for prediction in counting:
                columns.append(prediction.geometry,
                               {name: getattr(prediction, name) for name, _ in vectorio.OUTPUT_FIELDS})
        finally:
            stream.close()
        counts = (stream.total, stream.labelled, stream.skipped_nodata, stream.uncertain, counting.counts)
        parts = distributed.gather_object_on(group, (columns, counts))
    values = describe_values(stream.plan)
    if parts is None:  # not rank 0: this rank's block, written by rank 0
        return RasterSummary(raster=Path(raster), output=output, tiles=stream.total, labelled=stream.labelled,
                             skipped_nodata=stream.skipped_nodata, features=len(columns),
                             seconds=time.perf_counter() - start, class_counts=dict(counting.counts),
                             uncertain=stream.uncertain, values=values, plan=stream.plan)
    whole = _concatenate([c for c, _ in parts])
    tiles, labelled, skipped, uncertain = (sum(n[k] for _, n in parts) for k in range(4))
    classes: collections.Counter = sum((n[4] for _, n in parts), collections.Counter())
    if labelled == 0:
        raise CasdError(
            f"every tile of {stream.plan.name} has more than {stream.plan.nodata_threshold:.0%} nodata, so "
            f"nothing was labelled; check the nodata value or raise {param('nodata_threshold')}")
    geometry_type = "Polygon"
    if dissolve:  # as vectorio.write_predictions does it, on the whole raster's columns
        whole, geometry_type = vectorio.dissolve_columns(whole), "MultiPolygon"
    vectorio.write_layer(whole, output, stream.plan.crs, key, predictor.package, geometry_type, values)
    return RasterSummary(raster=Path(raster), output=output, tiles=tiles, labelled=labelled,
                         skipped_nodata=skipped, features=len(whole), seconds=time.perf_counter() - start,
                         class_counts=dict(classes.most_common()), uncertain=uncertain, values=values,
                         plan=stream.plan)


def _concatenate(parts: list[vectorio.FeatureColumns]) -> vectorio.FeatureColumns:
    """Column buffers one after the other, as if filled in one go."""
    whole = vectorio.FeatureColumns(parts[0].fields)
    for part in parts:
        offset = len(whole)
        for name, rows in part.null_rows.items():
            whole.null_rows.setdefault(name, []).extend(r + offset for r in rows)
        whole.geometry.extend(part.geometry)
        for name in whole.values:
            whole.values[name].extend(part.values[name])
    return whole
