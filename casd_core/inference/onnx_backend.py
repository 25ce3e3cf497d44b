"""The onnxruntime side of inference: an ``.onnx`` export classifies batches without PyTorch.

:class:`OrtPredictor` has :class:`~casd_core.inference.predictor.Predictor`'s interface (the
pipeline cannot tell them apart) and returns numpy arrays. Normalisation stays out of the
graph, in :meth:`OrtPredictor.stage` on the reader thread, exactly as the torch path does it:
there it overlaps with the model instead of taking the model's threads, the same float32
arithmetic feeds both runtimes, and the graph keeps Deepness's input convention
(standardised values). The graph ends in softmax(logits / temperature), so calibration is
applied identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from casd_core.errors import CasdError, param
from casd_core.inference.predictor import Predictor
from casd_core.onnx.metadata import INPUT_NAME, graph_info, package_from_props, props_of
from casd_core.onnx.safety import load_checked
from casd_core.package import ModelPackage
from casd_core.runtime import cpu_threads, tune_malloc


@dataclass(frozen=True)
class OrtDevice:
    """Where an onnxruntime session runs. ``type`` is not "cpu", so the torch thread tuner
    leaves it alone (onnxruntime fixes its thread pool when the session is made)."""

    provider: str
    type: str = "onnxruntime"

    def __str__(self) -> str:
        return f"onnxruntime ({self.provider})"


def _providers(device: str) -> list[str]:
    import onnxruntime

    name = (device or "auto").lower()
    available = onnxruntime.get_available_providers()
    if name in ("auto", "cpu"):
        return (["CUDAExecutionProvider"] if name == "auto" and "CUDAExecutionProvider" in available
                else []) + ["CPUExecutionProvider"]
    if name.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise CasdError(f"{param('device')} {device!r} is not available to onnxruntime here "
                    f"(it has {', '.join(available)}); use auto or cpu")


class OrtPredictor(Predictor):
    """An ``.onnx`` export in an onnxruntime session; same methods as :class:`Predictor`."""

    def __init__(self, package: ModelPackage, session: Any, name: str, graph: dict[str, Any]) -> None:
        self.package = package
        self.session = session
        self.name = name
        self.graph = graph
        self.device = OrtDevice(session.get_providers()[0])
        std = np.asarray(package.std, dtype=np.float32)
        mean = np.asarray(package.mean, dtype=np.float32)
        self._scale = (1.0 / (package.value_scale * std)).astype(np.float32)
        self._offset = (mean / std).astype(np.float32)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "auto",
                  threads: int | None = None) -> "OrtPredictor":
        """Check the file (:mod:`casd_core.onnx.safety`), read its package description, start a
        session with ``threads`` intra-op threads (default: the usable cores)."""
        import onnxruntime

        path = Path(path)
        model = load_checked(path)
        props = props_of(model)
        package = package_from_props(props, path.name)
        tune_malloc()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1
        # Idle threads that spin take the cores the pipeline's reader and writer need: the
        # int8 pipeline runs ~12 % faster without, the model alone ~3 % slower (BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are noise to users
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=_providers(device))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CasdError(f"onnxruntime cannot load {path.name} ({str(exc).splitlines()[0]}); "
                            "export it again with `casd export`") from None
        _check_interface(session, package, path.name)
        return cls(package, session, path.stem, graph_info(props))

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        return self.stage(np.asarray(raw))

    def stage(self, raw: np.ndarray) -> np.ndarray:
        """Raw values (N, C, H, W) → float32 model units, C-contiguous for onnxruntime; one
        long loop per band, with the torch path's constants and arithmetic."""
        x = np.empty(raw.shape, dtype=np.float32)
        for band in range(raw.shape[1]):
            np.multiply(raw[:, band], self._scale[band].item(), out=x[:, band], casting="unsafe")
            np.subtract(x[:, band], self._offset[band].item(), out=x[:, band])
        return x

    def predict(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Calibrated probabilities (N, K); with ``tta`` averaged over the 8 flips/rotations,
        in the same view order as :func:`casd_core.tta.dihedral_views`."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._check_size(batch.shape[2:])
        if not tta:
            return self._run(batch)
        if batch.shape[2] == batch.shape[3]:
            rotations = [np.rot90(batch, k, axes=(2, 3)) for k in range(4)]
            views = rotations + [np.flip(view, axis=3) for view in rotations]
        else:
            views = [batch, np.flip(batch, 3), np.flip(batch, 2), np.flip(batch, (2, 3))]
        probabilities = self._run(np.ascontiguousarray(np.concatenate(views)))
        return probabilities.reshape(len(views), batch.shape[0], -1).mean(0)

    def predict_raw(self, raw: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.predict(self.stage(np.asarray(raw)), tta)

    def predict_staged(self, staged: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.predict(staged, tta)

    def _check_size(self, shape: tuple[int, ...]) -> None:
        """The graph takes input_size tiles only (see :mod:`casd_core.onnx.export`); a package
        that knows its GSD is fed footprint / GSD pixels, so say which footprint fits."""
        size = self.package.input_size
        if tuple(shape) == (size, size):
            return
        fits = f"{size * self.package.gsd_m:g} m" if self.package.gsd_m else f"{size} px"
        raise CasdError(f"this ONNX model takes {size}-px tiles, and these tiles are {shape[1]}×{shape[0]} px; "
                        f"set {param('tile_size')} to {fits} (its recommended footprint), or run its "
                        ".safetensors package for other tile sizes")

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]


def _check_interface(session: Any, package: ModelPackage, name: str) -> None:
    """One (N, bands, size, size) input and one (N, classes) output, as the package says."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = [package.in_channels, package.input_size, package.input_size]
    if (len(inputs) != 1 or len(outputs) != 1 or inputs[0].name != INPUT_NAME
            or list(inputs[0].shape[1:]) != expected or outputs[0].shape[-1] != package.num_classes):
        raise CasdError(f"{name}'s graph does not match its description ({package.in_channels} bands, "
                        f"{package.input_size} px, {package.num_classes} classes); export it again with "
                        "`casd export`")
