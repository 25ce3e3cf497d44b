"""The provider's algorithms, one module per job."""

from .classify_folder import ClassifyFolderAlgorithm
from .classify_raster import ClassifyRasterAlgorithm
from .evaluate import EvaluateAlgorithm
from .train import TrainAlgorithm

ALGORITHMS = (ClassifyRasterAlgorithm, ClassifyFolderAlgorithm, TrainAlgorithm, EvaluateAlgorithm)
