"""Which model runtime this Python has: PyTorch (training, GPUs, ``.safetensors`` packages) or
only onnxruntime (classification with ``.onnx`` models, the light install for QGIS).

Modules on the classification path import torch lazily, so that path works without it; a
torch-only feature asked for in a light install raises :class:`CasdError` from
:func:`require_torch` instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from casd_core.errors import CasdError


def torch_available() -> bool:
    """Whether ``import torch`` can work here (checked without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(feature: str) -> Any:
    """``import torch`` for ``feature``, or a one-line error that says what to install."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise CasdError(f"{feature} needs PyTorch, which this Python does not have; classify with an "
                        "ONNX model (`casd export`, or the bundled one) or install the full dependencies "
                        "(pip install -r requirements.txt)") from None
    return torch
