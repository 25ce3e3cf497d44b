"""The provider's algorithms, one module per job."""

from .classify_folder import ClassifyFolderAlgorithm
from .classify_raster import ClassifyRasterAlgorithm
from .evaluate import EvaluateAlgorithm
from .make_chips import MakeChipsAlgorithm
from .train import TrainAlgorithm

ALGORITHMS = (ClassifyRasterAlgorithm, ClassifyFolderAlgorithm, MakeChipsAlgorithm, TrainAlgorithm, EvaluateAlgorithm)
