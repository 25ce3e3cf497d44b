"""classifyraster's optional files beside its layer: a quick-look PNG and a class raster.

Both are the core's (``casd_core.preview.render_preview``, ``casd_core.class_raster.
write_class_raster``), which read the tile layer from a file. The algorithm's own layer goes to
a Processing sink, which may be a memory layer or any format; so the predictions are also
written, with the core's writer, to a GeoPackage in the Processing temporary folder, used for
the two files and deleted. They are written only once the run has finished: a cancel leaves
neither.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from qgis.core import (QgsProcessingParameterFileDestination, QgsProcessingParameterRasterDestination,
                       QgsProcessingUtils)

PREVIEW = "PREVIEW"
RASTER_OUT = "RASTER_OUT"

HELP = (
    "<b>Preview</b> (optional) writes a PNG of the raster with each tile's class colour over it and "
    "a legend; <b>Class raster</b> (optional) writes a GeoTIFF with one pixel per tile holding its "
    "class id (uncertain and skipped tiles are nodata), with the class colours and names. Both are "
    "written after the run; a cancel writes neither."
)


def add_grid_outputs(algorithm) -> None:
    algorithm.addParameter(QgsProcessingParameterFileDestination(
        PREVIEW, "Preview (PNG of the classes over the raster)", fileFilter="PNG image (*.png)",
        optional=True, createByDefault=False))
    algorithm.addParameter(QgsProcessingParameterRasterDestination(
        RASTER_OUT, "Class raster (one pixel per tile)", optional=True, createByDefault=False))


def requested(algorithm, parameters: dict, context, smooth: bool) -> tuple[str, str]:
    """(preview path, class raster path), "" for one not asked for; checked before the run."""
    from casd_core.grid_outputs import check_requests

    preview = algorithm.parameterAsFileOutput(parameters, PREVIEW, context) or ""
    raster_out = algorithm.parameterAsOutputLayer(parameters, RASTER_OUT, context) or ""
    check_requests(raster_out, smooth, dissolve=False)
    return preview, raster_out


def write_grid_outputs(predictions: list, plan, package, preview: str, raster_out: str) -> dict[str, str]:
    """Write the requested files from the run's ``predictions`` over ``plan`` (the core's
    :class:`RasterPlan`); returns {parameter name: path written}."""
    from casd_core import grid_outputs
    from casd_core.vectorio import write_predictions

    if not (preview or raster_out):
        return {}
    layer = Path(QgsProcessingUtils.tempFolder()) / f"casd_tiles_{uuid.uuid4().hex[:12]}.gpkg"
    try:
        write_predictions(predictions, layer, plan.crs, "gpkg")
        written = grid_outputs.write_grid_outputs(layer, plan, package, preview or None, raster_out or None)
    finally:
        layer.unlink(missing_ok=True)
    return {{"preview": PREVIEW, "raster_out": RASTER_OUT}[key]: os.fspath(path) for key, path in written.items()}
