"""Where and how a process computes: device choice and CPU tuning (malloc, thread count, the
adaptive thread tuner) shared by training, evaluation and inference. torch is imported where
it is used, so the onnxruntime path runs without it."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

from casd_core.errors import CasdError, param

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Once per process, tell glibc malloc to keep freed memory instead of returning it.

    Without it, every batch's activations are mmap'd and unmapped again (millions of page
    faults; batch 32 runs ~2.7× slower on CPU). Same knobs as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``, set at run
    time so the CLI and QGIS both get them. The cost: the process keeps its peak heap.
    ``CASD_MALLOC_TUNING=0`` turns it off. Returns whether the settings are in effect.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if sys.platform.startswith("linux") and os.environ.get("CASD_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _malloc_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
            except (OSError, AttributeError):  # not glibc
                _malloc_tuned = False
    return _malloc_tuned


def cpu_threads() -> int:
    """Cores this process may run on (``OMP_NUM_THREADS`` wins when set)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` → CUDA if present, else Apple MPS, else CPU; an explicit device must exist."""
    import torch

    name = (device or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise CasdError(f"{param('device')} {device!r} is not a device name; use auto, cpu, "
                        "cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CasdError(f"{param('device')} {device!r} was asked for but no CUDA GPU is "
                        "available; use cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None \
            and resolved.index >= torch.cuda.device_count():
        raise CasdError(f"{param('device')} {device!r} does not exist: this machine has "
                        f"{torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type == "mps" and not (mps is not None and mps.is_available()):
        raise CasdError(f"{param('device')} 'mps' was asked for but is not available; use cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise CasdError(f"{param('device')} {device!r} is not supported; use auto, cpu, cuda or mps")
    return resolved


def prefers_channels_last(device: "torch.device") -> bool:
    """Whether convolutions run faster in the channels_last memory format on ``device``: on
    CUDA, and on a CPU with oneDNN (EfficientNet-Lite0 at 224 px on this x86 machine: 1.7-2.2x
    faster training steps, benchmarks/bench_training.py, and ~1.5x faster inference,
    benchmarks/bench_model.py; oneDNN's channels_last kernels are what makes it faster)."""
    import torch

    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def prepare_cpu() -> None:
    """Malloc tuning plus no more torch threads than usable cores (more only thrash)."""
    import torch

    tune_malloc()
    if torch.get_num_threads() > cpu_threads():
        torch.set_num_threads(cpu_threads())


class ThreadTuner:
    """Chooses, on CPU, between the threads torch was given and a single thread, by the
    model's measured speed, and re-checks now and then.

    OpenMP threads spin while they wait for each other at every layer: on an idle machine
    that is the fastest way to run (the benchmark's bound), but when another process needs
    a core, one preempted thread stalls the whole team and a batch runs 2-10× slower than on
    one thread. After a warm-up batch the full team is timed on ``probe`` batches, then one
    thread; the faster is kept (the other must win by 10%), and every ``period`` batches the
    other setting is timed again, so a run follows the machine's load. :meth:`restore` puts
    torch's thread count back. Disabled, it never touches torch (onnxruntime fixes its threads
    when the session is made).
    """

    def __init__(self, enabled: bool = True, period: int = 48, probe: int = 3) -> None:
        self.enabled = enabled
        # Disabled, it reports torch's team where torch is loaded anyway (the torch path), else 1.
        torch = _torch() if enabled else sys.modules.get("torch")
        self.full = torch.get_num_threads() if torch is not None else 1
        self.options = [self.full, 1] if enabled and self.full > 1 else [self.full]
        self.period, self.probe = period, probe
        self.rates: dict[int, float] = {}
        self.current = self.full
        self._batches = 0
        self._since_probe = 0
        self._window: list[tuple[int, float]] = []  # (tiles, seconds) at self.current

    def record(self, tiles: int, seconds: float) -> None:
        """Account one batch run at the current setting; switch setting when due."""
        self._batches += 1
        if len(self.options) == 1 or self._batches == 1:  # the first batch warms up
            return
        self._window.append((tiles, seconds))
        if len(self._window) < self.probe:
            return
        rate = sum(n for n, _ in self._window) / max(sum(t for _, t in self._window), 1e-9)
        self._window = []
        self.rates[self.current] = rate
        other = self.options[1] if self.current == self.options[0] else self.options[0]
        if other not in self.rates:
            self._use(other)  # first comparison
            return
        best = max(self.rates, key=self.rates.get)
        if best != self.current and self.rates[best] < 1.1 * self.rates[self.current]:
            best = self.current
        self._since_probe += self.probe
        if best != self.current:
            self._use(best)
        elif self._since_probe >= self.period:
            self._since_probe = 0
            del self.rates[other]  # stale: measure it again
            self._use(other)

    def _use(self, threads: int) -> None:
        self.current = threads
        _torch().set_num_threads(threads)

    def restore(self) -> None:
        if self.enabled and _torch().get_num_threads() != self.full:
            _torch().set_num_threads(self.full)


def _torch():
    import torch

    return torch

