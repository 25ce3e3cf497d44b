"""The provider's algorithms, one module per job."""

from .classify_folder import ClassifyFolderAlgorithm
from .classify_raster import ClassifyRasterAlgorithm
from .evaluate import EvaluateAlgorithm
from .export_model import ExportModelAlgorithm
from .make_chips import MakeChipsAlgorithm
from .train import TrainAlgorithm
from .train_from_polygons import TrainFromPolygonsAlgorithm

ALGORITHMS = (ClassifyRasterAlgorithm, ClassifyFolderAlgorithm, MakeChipsAlgorithm, TrainAlgorithm, EvaluateAlgorithm,
              TrainFromPolygonsAlgorithm, ExportModelAlgorithm)
# Left out where PyTorch is not installed (the light install classifies with ONNX models only).
TORCH_ONLY = (TrainAlgorithm, EvaluateAlgorithm, TrainFromPolygonsAlgorithm, ExportModelAlgorithm)
