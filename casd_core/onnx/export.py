"""A model package → a self-describing ONNX model (``casd export``).

The graph takes normalised float input (N, C, H, W) with a dynamic batch and returns
softmax(logits / temperature), at the package's input size. (A package that knows its GSD
is fed footprint / GSD pixels per tile, which is the input size at its recommended footprint;
the ONNX predictor refuses other tile sizes, see :mod:`casd_core.inference.onnx_backend`: the
model code's TF-style "same" padding is Python arithmetic on the input's shape, which tracing
bakes in, so one graph cannot serve every size.) Traced at a fixed batch and constant-folded
by onnxruntime's basic (standard-op) optimiser, that padding becomes constant pads, leaving
~110 plain nodes (Conv, Clip, Pad, Add, pooling, Gemm, Softmax); each Pad then goes into
its Conv's own padding, leaving ~95, the graph int8 quantization works best on; the batch is then made dynamic again (the one Reshape keeps the input's batch). Normalisation stays outside the graph (the reader thread does
it, see :mod:`casd_core.inference.onnx_backend`). ``half`` stores the weights as float16 with a
Cast in front of each (onnxruntime folds them back to float32 at load: fp32 speed, half the
file; the bundled default model uses it, its weights are already fp16 in the package). ``int8``
quantizes (:mod:`casd_core.onnx.quantize`). The written file is checked against
:mod:`casd_core.onnx.safety` and, for float graphs, against the torch model on real-sized
input before it replaces anything.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from casd_core.atomic import atomic_path
from casd_core.backend import require_torch
from casd_core.errors import CasdError, param
from casd_core.onnx.metadata import INPUT_NAME, OUTPUT_NAME, package_props
from casd_core.onnx.quantize import CalibrationConfig, calibration_batches, quantize_int8
from casd_core.onnx.safety import check_model, drop_unused_opsets
from casd_core.package import ModelPackage, default_model_path
from casd_core.progress import Monitor

OPSET = 17
TRACE_BATCH = 7  # traced at this batch, then made dynamic: a size no layer has, so it is recognisable
NORMALISATION = "outside the graph: (raw / value_scale - mean) / std per band, by the reader"
FLOAT_TOLERANCE = 1e-4  # max |p_onnx - p_torch| accepted for a float export
HALF_TOLERANCE = 1e-2  # the same with fp16-stored weights (0 when the package's weights are fp16)


def export_onnx(model: str | os.PathLike | None, output: str | os.PathLike, *, half: bool = False,
                int8: bool = False, calibration: CalibrationConfig | None = None,
                monitor: Monitor | None = None) -> Path:
    """Export the package ``model`` (``None``: the embedded default) to ``output`` (atomic)."""
    torch = require_torch("casd export")
    import onnx

    monitor = monitor or Monitor()
    source = Path(model) if model is not None else default_model_path().with_suffix(".safetensors")
    if source.suffix.lower() == ".onnx":
        raise CasdError(f"{source.name} is already an ONNX model; export the .safetensors package it came from")
    if int8 and calibration is None:
        raise CasdError(f"an int8 export needs calibration images: pass a {param('split_csv')} "
                        "whose train rows to use")
    package = ModelPackage.load(source)
    network = _Probabilities(package.build_model(), package.temperature, torch).eval()
    example = torch.zeros(TRACE_BATCH, package.in_channels, package.input_size, package.input_size)
    monitor.report("export", 0, 1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the same-padding arithmetic
        torch.onnx.export(network, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=OPSET, dynamo=False)
    graph = _folded_dynamic(buffer.getvalue())
    precision = "fp32"
    if int8:
        graph = quantize_int8(graph, calibration_batches(package, calibration), monitor)
        precision = "int8"
    elif half:
        _store_half(graph)
        precision = "fp32 (weights stored as fp16)"
        _check_against_torch(graph, network, package, torch, HALF_TOLERANCE)
    else:
        _check_against_torch(graph, network, package, torch, FLOAT_TOLERANCE)
    del graph.metadata_props[:]
    info = {"precision": precision, "normalisation": NORMALISATION, "source": source.name,
            "opset": OPSET}
    if int8:
        info["calibration"] = {"split_csv": Path(calibration.split_csv).name, "rows": "train",
                               "per_class": calibration.calibration_per_class}
    onnx.helper.set_model_props(graph, package_props(package, info))
    output = Path(output)
    check_model(graph, output.parent, output.name)
    with atomic_path(output) as tmp:
        onnx.save(graph, tmp)
    monitor.report("export", 1, 1)
    return output


def _folded_dynamic(traced: bytes) -> Any:
    """The fixed-batch trace constant-folded, then with a dynamic batch (see the module doc)."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory(prefix="casd-export-") as tmp:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        options.log_severity_level = 3
        onnxruntime.InferenceSession(traced, options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    drop_unused_opsets(model)
    _fold_pads_into_convs(model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            shape = numpy_helper.to_array(tensor).copy()
            if len(shape) and shape[0] == TRACE_BATCH:
                shape[0] = 0  # 0 = this dimension of the input, i.e. its batch
                tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    del model.graph.value_info[:]  # intermediate shapes carry the traced batch
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def _fold_pads_into_convs(model: Any) -> None:
    """Each zero Pad that feeds one Conv only becomes that Conv's own (asymmetric) ``pads``.

    The folded "same" padding leaves 17 Pad nodes in front of the strided convs; left alone
    they took ~half of onnxruntime's time (a layout reorder around each fp32 Pad; an int8
    dequantize-pad-quantize round trip around each quantized one), docs/BENCHMARKS.md."""
    from onnx import helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in outputs or len(consumers.get(pad.output[0], [])) != 1:
            continue
        conv = consumers[pad.output[0]][0]
        widths = _spatial_zero_padding(pad, initializers)
        if (widths is None or conv.op_type != "Conv" or conv.input[0] != pad.output[0]
                or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute)):
            continue
        own = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", [a + b for a, b in zip(own, widths)])])
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)


def _spatial_zero_padding(pad: Any, initializers: dict[str, Any]) -> list[int] | None:
    """A Pad's widths in a Conv's ``pads`` order (top, left, bottom, right) when it pads an
    (N, C, H, W) tensor with constant zeros along H and W only; else ``None``."""
    from onnx import numpy_helper

    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) < 2 or pad.input[1] not in initializers:
        return None
    if len(pad.input) > 2 and pad.input[2]:  # an explicit fill value: only zero folds
        value = initializers.get(pad.input[2])
        if value is None or numpy_helper.to_array(value).any():
            return None
    widths = numpy_helper.to_array(initializers[pad.input[1]]).astype(np.int64)
    if len(widths) != 8 or widths[[0, 1, 4, 5]].any() or (widths < 0).any():
        return None  # another rank, padding the batch or channels, or cropping
    return [int(w) for w in widths[[2, 3, 6, 7]]]


class _Probabilities:
    """Built lazily so this module imports without torch: the package's network + softmax(z / T)."""

    def __new__(cls, network: Any, temperature: float, torch: Any) -> Any:
        class Probabilities(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.network = network

            def forward(self, x: Any) -> Any:
                return torch.softmax(self.network(x) / temperature, dim=1)

        return Probabilities()


def _store_half(model: Any) -> None:
    """float32 initializers → float16 + Cast back (see the module doc); small ones stay."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    casts = []
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < 64:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}.fp16")
        casts.append(onnx.helper.make_node("Cast", [half.name], [tensor.name], to=onnx.TensorProto.FLOAT,
                                           name=f"{tensor.name}.cast"))
        graph.initializer[index].CopyFrom(half)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _check_against_torch(graph: Any, network: Any, package: ModelPackage, torch: Any,
                         tolerance: float) -> None:
    """The exported graph gives the torch model's probabilities on a random batch."""
    import onnxruntime

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, package.in_channels, package.input_size, package.input_size, generator=generator)
    with torch.inference_mode():
        expected = network(x).numpy()
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > tolerance:
        raise CasdError(f"the ONNX graph's probabilities differ from the torch model's by {difference:.2g} "
                        f"(more than {tolerance:g}); please report this with the model package")
