"""The files beside a labelled grid: a quick-look PNG (:mod:`casd_core.preview`) and a class
raster (:mod:`casd_core.class_raster`), both made from the tile layer a run wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from casd_core.errors import CasdError, param


def check_requests(raster_out: str | os.PathLike | None, smooth: bool, dissolve: bool) -> None:
    """Refuse, before the run, a class raster the run cannot make."""
    if not raster_out:
        return
    if Path(raster_out).suffix.lower() not in (".tif", ".tiff"):
        raise CasdError(f"{param('raster_out')} {Path(raster_out).name} must be a GeoTIFF (.tif)")
    for key, wanted in (("smooth", smooth), ("dissolve", dissolve)):
        if wanted:
            raise CasdError(f"{param('raster_out')} has one pixel per tile, but {param(key)} makes "
                            "features that are not tiles; leave one of them out")


def write_grid_outputs(layer: str | os.PathLike, plan: Any, package: Any,
                       preview: str | os.PathLike | None = None,
                       raster_out: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the requested files from ``layer`` over ``plan`` (the run's
    :class:`~casd_core.inference.raster.RasterPlan`); returns {"preview"/"raster_out": path}."""
    from casd_core.class_raster import write_class_raster
    from casd_core.preview import render_preview

    written: dict[str, Path] = {}
    if preview:
        bands = plan.bands if len(plan.bands) in (1, 3) else None  # what the model saw, if drawable
        written["preview"] = Path(os.fspath(render_preview(plan.path, layer, preview, package, bands=bands)))
    if raster_out:
        written["raster_out"] = write_class_raster(layer, plan.grid, raster_out, package)
    return written
