"""Classify every tile of a raster, or of a folder of rasters.

One job per module, in the order data flows::

    radiometry.py how raw values become the model's input: one mapping per raster (RadiometryConfig)
    padding.py    black/white borders without a nodata flag, treated as nodata (PaddingMask)
    raster.py     open a raster, choose its bands, plan grid/resampling/nodata/values (RasterPlan)
    reader.py     read batches of tiles in the background (TileReader)
    predictor.py  the model package, batched and normalised on the device, TTA (Predictor)
    labels.py     probabilities -> features: top-3, abstention, smoothing onto cells (TilePrediction)
    pipeline.py   stream TilePredictions over one raster (iter_tile_predictions, TileStream)
    classify.py   one raster -> one output file, atomically; rows shared over ranks (classify_raster)
    batch.py      a folder: one output per raster, resumable (classify_folder)

The public names are re-exported here, so ``from casd_core.inference import Predictor`` keeps
working whatever module a name lives in.
"""

from casd_core.inference.batch import (BatchSummary, FileResult, RASTER_SUFFIXES, classify_folder,
                                       find_rasters, output_path_for)
from casd_core.inference.classify import RasterSummary, classify_raster, predictor_for
from casd_core.inference.labels import TilePrediction
from casd_core.inference.pipeline import InferenceConfig, TileStream, iter_tile_predictions
from casd_core.inference.predictor import Predictor
from casd_core.inference.radiometry import RadiometryConfig
from casd_core.inference.raster import RasterPlan, nodata_mask, open_raster, plan_raster, select_bands
from casd_core.inference.reader import TileReader
from casd_core.runtime import ThreadTuner

__all__ = [
    "BatchSummary", "FileResult", "InferenceConfig", "Predictor", "RASTER_SUFFIXES", "RadiometryConfig", "RasterPlan",
    "RasterSummary", "ThreadTuner", "TilePrediction", "TileReader", "TileStream", "classify_folder",
    "classify_raster", "find_rasters", "iter_tile_predictions", "nodata_mask", "open_raster",
    "output_path_for", "plan_raster", "predictor_for", "select_bands",
]
