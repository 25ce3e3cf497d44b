"""Static int8 quantization of an exported graph, calibrated on training images only.

onnxruntime.quantization, QDQ format (standard QuantizeLinear/DequantizeLinear pairs that
onnxruntime fuses into int8 kernels at load; no contrib-op domain in the file), weights int8
per output channel, activations uint8 with min/max ranges observed on the calibration
images. The final Softmax stays in float (its input is the calibrated logits). The images are
training rows of a split CSV, never validation or test rows, read and normalised like
evaluation reads them.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from casd_core.errors import CasdError, param
from casd_core.onnx.metadata import INPUT_NAME
from casd_core.onnx.safety import drop_unused_opsets
from casd_core.package import ModelPackage
from casd_core.progress import Monitor

# op types whose int8 kernels onnxruntime's CPU provider has; everything else stays float
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Clip", "Relu", "GlobalAveragePool", "Pad")


@dataclass
class CalibrationConfig:
    """Which training images calibrate the int8 ranges: the ``train`` rows of ``split_csv``
    (paths relative to ``data_root``, default: the CSV's folder), the first
    ``calibration_per_class`` of each class in file order, read in batches of ``batch_size``."""

    split_csv: Path
    data_root: Path | None = None
    calibration_per_class: int = 10
    batch_size: int = 32

    def validate(self) -> None:
        if self.calibration_per_class < 1:
            raise CasdError(f"{param('calibration_per_class')} {self.calibration_per_class} must be at least 1")


def calibration_batches(package: ModelPackage, config: CalibrationConfig) -> list[np.ndarray]:
    """Normalised float32 batches (N, C, H, W) of the chosen training images."""
    from casd_core.data import SceneDataset, build_transforms, read_split

    config.validate()
    root = Path(config.data_root) if config.data_root is not None else Path(config.split_csv).parent
    splits, class_names = read_split(Path(config.split_csv), root)
    train = splits.get("train", [])
    if not train:
        raise CasdError(f"{param('split_csv')} {config.split_csv} has no train rows to calibrate on")
    taken: dict[int, int] = defaultdict(int)
    chosen = []
    for sample in train:
        if taken[sample.label] < config.calibration_per_class:
            taken[sample.label] += 1
            chosen.append(sample)
    bands = package.training.get("bands")
    dataset = SceneDataset(chosen, class_names,
                           build_transforms(package.input_size, package.mean, package.std, train=False),
                           bands=bands, value_scale=package.value_scale)
    images = [dataset[i][0].numpy() for i in range(len(dataset))]
    return [np.stack(images[i:i + config.batch_size]).astype(np.float32)
            for i in range(0, len(images), config.batch_size)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared batches."""

    def __init__(self, batches: list[np.ndarray], monitor: Monitor) -> None:
        self.batches, self.monitor, self.index = batches, monitor, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index == len(self.batches):
            return None
        self.monitor.report("calibration batches", self.index, len(self.batches))
        self.index += 1
        return {INPUT_NAME: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def quantize_int8(model: Any, batches: list[np.ndarray], monitor: Monitor | None = None) -> Any:
    """The int8 (QDQ, per-channel) version of the float ``model`` (a ModelProto)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    monitor = monitor or Monitor()
    softmax = [node.name for node in model.graph.node if node.op_type == "Softmax"]
    with tempfile.TemporaryDirectory(prefix="casd-int8-") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, source)
        # shape inference only: onnxruntime's own graph optimisations would write contrib ops
        quant_pre_process(str(source), str(prepared), skip_optimization=True)
        quantize_static(str(prepared), str(target), _Reader(batches, monitor),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=softmax)
        quantized = onnx.load(str(target))
    drop_unused_opsets(quantized)
    return quantized
