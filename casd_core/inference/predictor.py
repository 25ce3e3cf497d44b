"""The model side of inference: a loaded model package that classifies batches of tiles.

CPU speed: the first :class:`Predictor` tells glibc's allocator to keep freed memory
(``mallopt``; see ``../shared/docs/ENVIRONMENT.md``: ~2.7x faster batched inference on CPU)
and never uses more threads than the process may use cores.

Two runtimes behind one interface: :class:`Predictor` runs a ``.safetensors`` package in
PyTorch; :meth:`Predictor.from_package` hands an ``.onnx`` export to
:class:`~casd_core.inference.onnx_backend.OrtPredictor` (a subclass, onnxruntime, no torch).
torch is imported when a torch predictor is made, so this module loads without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from casd_core.backend import require_torch
from casd_core.errors import CasdError, param
from casd_core.package import ModelPackage, default_model_path

if TYPE_CHECKING:
    import torch


class Predictor:
    """A loaded model package, ready to classify batches.

    ``predict`` takes a float batch (N, C, H, W) already in model units (scaled and
    normalised) and returns class probabilities (N, K) as float32 on the CPU.
    ``predict_raw`` takes raw pixel values (as read from the raster) and normalises them on
    the device. The pipeline splits that in two: :meth:`stage` on a reader thread, then
    :meth:`predict_staged` on the model's thread. Runs in ``torch.inference_mode``, in the
    channels_last memory format (faster here on CPU, and on CUDA), with float16 autocast on
    CUDA.
    """

    def __init__(self, package: ModelPackage, device: str = "auto",
                 name: str | None = None) -> None:
        torch = require_torch("running a .safetensors model package")
        from casd_core.runtime import prefers_channels_last, prepare_cpu, resolve_device

        self.package = package
        self.device = resolve_device(device)
        self.name = name or package.backbone
        prepare_cpu()
        model = package.build_model().to(self.device)
        self.channels_last = prefers_channels_last(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.autocast = self.device.type == "cuda"
        std = torch.tensor(package.std, dtype=torch.float32)
        mean = torch.tensor(package.mean, dtype=torch.float32)
        self._scale = (1.0 / (package.value_scale * std)).view(1, -1, 1, 1).to(self.device)
        self._offset = (mean / std).view(1, -1, 1, 1).to(self.device)

    @classmethod
    def from_package(cls, path_or_package: str | os.PathLike | ModelPackage | None,
                     device: str = "auto") -> "Predictor":
        """Load a package file (``None``: the embedded default model) or wrap a package; an
        ``.onnx`` file gives an :class:`~casd_core.inference.onnx_backend.OrtPredictor`."""
        if isinstance(path_or_package, ModelPackage):
            return cls(path_or_package, device)
        path = Path(path_or_package) if path_or_package is not None else default_model_path()
        if path_or_package is None and not path.is_file():
            raise CasdError(f"the default model {path} is missing; pass a {param('model')} "
                            "or reinstall casd")
        if path.suffix.lower() == ".onnx":
            from casd_core.inference.onnx_backend import OrtPredictor

            return OrtPredictor.from_file(path, device)
        return cls(ModelPackage.load(path), device, name=path.stem)

    @property
    def class_names(self) -> list[str]:
        return self.package.class_names

    @property
    def input_size(self) -> int:
        return self.package.input_size

    def preprocess(self, raw: "np.ndarray | torch.Tensor") -> "torch.Tensor":
        """Raw pixel values (N, C, H, W) → float batch in model units, on the device."""
        import torch

        if isinstance(raw, np.ndarray) and raw.dtype not in (np.uint8, np.float32):
            raw = raw.astype(np.float32)  # dtypes torch handles poorly (uint16, uint32, ...)
        x = torch.as_tensor(raw)
        if self.device.type == "cuda":
            x = x.pin_memory() if x.device.type == "cpu" else x
        x = x.to(self.device, non_blocking=True).float()
        # Out of place: for a float32 input on the device, x *is* the caller's array, and
        # normalising it in place made every later call on it see other values.
        return x * self._scale - self._offset

    def _logits(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            return self.model(x)

    def predict(self, batch: "torch.Tensor", tta: bool = False) -> "torch.Tensor":
        """Calibrated probabilities (softmax of logits / the package's temperature); with
        ``tta``, averaged over the 8 flips and rotations of each tile (8x the cost)."""
        import torch

        from casd_core.tta import averaged_probabilities

        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            return averaged_probabilities(self._logits, x, self.package.temperature, tta).cpu()

    def predict_raw(self, raw: "np.ndarray | torch.Tensor", tta: bool = False) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            return self.predict(self.preprocess(raw), tta)

    def stage(self, raw: np.ndarray) -> "np.ndarray | torch.Tensor":
        """The host-side part of preprocessing, safe on any thread.

        On CPU: the whole normalisation in numpy (one thread, overlapped with the model,
        instead of waking the model's threads for it): a float tensor in model units. On a
        GPU: nothing, so the batch travels as raw integers (4× less to copy for uint8).
        """
        import torch

        if self.device.type != "cpu":
            return raw
        # Output in (N, H, W, C) memory, i.e. a channels_last tensor the model uses without
        # a layout copy; one long strided loop per band (a broadcast over the 3-long band
        # axis would make numpy's inner loop 3 elements long: ~4x slower).
        nhwc = raw.transpose(0, 2, 3, 1)
        x = np.empty(nhwc.shape, dtype=np.float32)
        for band in range(nhwc.shape[3]):
            np.multiply(nhwc[..., band], self._scale[0, band, 0, 0].item(), out=x[..., band],
                        casting="unsafe")
            np.subtract(x[..., band], self._offset[0, band, 0, 0].item(), out=x[..., band])
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    def predict_staged(self, staged: "np.ndarray | torch.Tensor", tta: bool = False) -> "torch.Tensor":
        """Probabilities for the output of :meth:`stage`."""
        import torch

        if isinstance(staged, torch.Tensor):
            return self.predict(staged, tta)
        return self.predict_raw(staged, tta)

