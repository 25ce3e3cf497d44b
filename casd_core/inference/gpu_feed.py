"""Keeping a CUDA GPU busy: batches from pinned memory, copied on a side stream while the
model runs on the previous one, results fetched one batch late.

The reader processes (:class:`~casd_core.inference.reader.ProcessTileReader`) fill shared
slots; :class:`PinnedSlots` page-locks them so a host-to-device copy is a DMA the CPU does
not wait for. :class:`CudaLauncher` queues each batch (copy on its own stream, the model in
float16 autocast and channels_last on the compute stream, probabilities copied back into
pinned memory) and returns at once; the pipeline labels batch i while the GPU computes
batch i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch

from casd_core.inference.predictor import Predictor
from casd_core.tta import averaged_probabilities


class PinnedSlots:
    """Page-locks host buffers (``cudaHostRegister``) until :meth:`close`. Buffers that
    cannot be registered stay pageable: their copies are then synchronous, not wrong."""

    def __init__(self, buffers: list[np.ndarray]) -> None:
        cudart = torch.cuda.cudart()
        self._registered = []
        for buffer in buffers:
            pointer = buffer.ctypes.data
            if int(cudart.cudaHostRegister(pointer, buffer.nbytes, 0)) == 0:
                self._registered.append(pointer)

    @property
    def count(self) -> int:
        return len(self._registered)

    def close(self) -> None:
        torch.cuda.synchronize()  # no copy from these buffers may still be running
        cudart = torch.cuda.cudart()
        for pointer in self._registered:
            cudart.cudaHostUnregister(pointer)
        self._registered = []


@dataclass
class Launched:
    """A batch in flight: its probabilities land in ``host`` when ``done`` has happened."""

    host: torch.Tensor
    done: torch.cuda.Event


class CudaLauncher:
    """Queues batches of raw tile values on ``predictor``'s GPU without waiting for them."""

    def __init__(self, predictor: Predictor, tta: bool = False) -> None:
        self.predictor = predictor
        self.tta = tta
        self.device = predictor.device
        self.copy_stream = torch.cuda.Stream(self.device)

    @torch.inference_mode()
    def launch(self, raw: np.ndarray | torch.Tensor) -> Launched:
        """Queue one batch (N, C, H, W) of raw values; returns before the GPU has run it.
        ``raw`` must stay untouched until the result is fetched (its copy is asynchronous)."""
        predictor = self.predictor
        x = torch.as_tensor(raw)
        if x.dtype not in (torch.uint8, torch.float32):  # as Predictor.preprocess does
            x = x.float()
        compute = torch.cuda.current_stream(self.device)
        # The copy runs on its own stream, beside the model still busy with earlier batches;
        # the model waits for it, and record_stream keeps its memory until the model is done.
        with torch.cuda.stream(self.copy_stream):
            on_gpu = x.to(self.device, non_blocking=True)
        compute.wait_stream(self.copy_stream)
        on_gpu.record_stream(compute)
        batch = on_gpu.float().mul_(predictor._scale).sub_(predictor._offset)
        # _logits: channels_last and float16 autocast, as Predictor.predict runs them.
        probabilities = averaged_probabilities(predictor._logits, batch, predictor.package.temperature,
                                               self.tta)
        host = torch.empty(probabilities.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(probabilities, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return Launched(host, done)

    @staticmethod
    def result(launched: Launched) -> torch.Tensor:
        """The probabilities (N, K) on the CPU, once the GPU has produced them."""
        launched.done.synchronize()
        return launched.host
