"""The model package: one file that fully describes a trained scene classifier.

It is the contract between training and inference. Everything inference needs (classes and
their colours, bands, normalisation, value scale, input size, ground footprint) is read from
it, never passed around separately.

Format: a ``safetensors`` file. The weights are plain tensors; everything else is one JSON
document stored in the safetensors header metadata under the key ``"casd"``. Loading parses
JSON and raw tensor bytes only, so a file from a stranger cannot execute code (unlike pickle).
An ``.onnx`` export (``casd export``) carries the same JSON document in its ``metadata_props``:
:meth:`ModelPackage.load` reads either (an ONNX one without weights: onnxruntime runs its graph).
torch is imported only where weights are touched, so classification with ONNX works without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casd_core.atomic import atomic_path
from casd_core.backend import require_torch, torch_available
from casd_core.errors import CasdError, param
from casd_core.style import default_class_colors  # noqa: F401  (part of the package API)

FORMAT_NAME = "casd-model-package"
# 2: temperature and pixel_stats (version-1 files load with their defaults)
FORMAT_VERSION = 2
METADATA_KEY = "casd"
DEFAULT_MODEL = "casd_aid_default"

if TYPE_CHECKING:
    import torch

@dataclass
class ModelPackage:
    """A trained classifier and everything needed to apply it to new imagery.

    ``value_scale`` maps raw pixel values to [0, 1] (255 for uint8, e.g. 10000 or 65535 for
    uint16); ``mean``/``std`` are then applied per band. ``gsd_m`` is the nominal ground
    sample distance the model was trained at and ``tile_footprint_m`` the recommended ground
    size of one tile; both are ``None`` when unknown.

    ``temperature`` divides the logits before the softmax so that scores are calibrated
    (fitted on the validation split; 1.0 = not calibrated). ``pixel_stats`` describes the
    training pixels per band in raw units (keys ``percentiles`` (the two levels, e.g. 0.5 and
    99.5), ``low``, ``high``, ``mean``, ``std``), so inference can tell whether a raster's
    values fit the model and map them when they do not; ``None`` when unknown.
    """

    backbone: str
    class_names: list[str]
    class_colors: list[str]
    bands: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    value_scale: float = 255.0
    gsd_m: float | None = None
    tile_footprint_m: float | None = None
    temperature: float = 1.0
    pixel_stats: dict[str, list[float]] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, "torch.Tensor"] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as the JSON document stored in the file."""
        meta = asdict(self)
        meta.pop("state_dict")
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}

    def build_model(self) -> "torch.nn.Module":
        """The architecture with this package's weights loaded, in eval mode."""
        require_torch("building the model of a package")
        if not self.state_dict:
            raise CasdError("this model holds no PyTorch weights (an .onnx export runs in onnxruntime "
                            "only); use the .safetensors package it was exported from")
        from casd_core.models import build_model

        model = build_model(self.backbone, self.num_classes, in_channels=self.in_channels,
                            pretrained=None)
        try:
            model.load_state_dict(self.state_dict)  # float32: load() reads every storage as that
        except RuntimeError as exc:
            raise CasdError(
                f"the weights in this package do not fit a {self.backbone!r} with "
                f"{self.num_classes} classes and {self.in_channels} bands ({exc}); "
                "re-export the model with `casd train`"
            ) from None
        return model.eval()

    def save(self, path: str | os.PathLike, half: bool = False) -> Path:
        """Write the package atomically (temp file + rename); ``half`` stores fp16 weights."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for name, tensor in self.state_dict.items():
            tensor = tensor.detach().cpu().contiguous()
            if half and tensor.is_floating_point():
                tensor = tensor.half()
            tensors[name] = tensor
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelPackage":
        """Read a package (``.safetensors``, its weights as float32) or the description of an
        ``.onnx`` export (no weights); anything that is neither is refused with a clear message."""
        path = Path(path)
        if not path.is_file():
            raise CasdError(f"{param('model')} {path} does not exist; pass the .safetensors file "
                            "written by training (or its .onnx export)")
        if path.suffix.lower() == ".onnx":
            from casd_core.onnx.metadata import read_package

            return read_package(path)
        require_torch(f"the .safetensors model package {path.name}")
        from safetensors import SafetensorError, safe_open

        not_a_package = (f"{path} is not a CASD model package (expected the .safetensors "
                         "file written by `casd train`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                # float32 whatever the storage (``save(half=True)``): every consumer then sees
                # one dtype, and a fine-tune's weights compare with the package's
                state_dict = {name: _float32(handle.get_tensor(name)) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CasdError(f"{not_a_package}: {exc}") from None
        try:
            meta = json.loads(header[METADATA_KEY])
        except (KeyError, json.JSONDecodeError):
            raise CasdError(f"{not_a_package}: its description is missing or unreadable") from None
        return cls.from_metadata(meta, state_dict, not_a_package)

    @classmethod
    def from_metadata(cls, meta: Any, state_dict: dict[str, "torch.Tensor"],
                      not_a_package: str) -> "ModelPackage":
        """A package from its JSON document (checked), with these weights."""
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise CasdError(not_a_package)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CasdError(f"this model package was written by a newer casd_core "
                            f"(format {meta['format_version']}); upgrade casd_core")
        fields = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
        try:
            package = cls(**fields, state_dict=state_dict)
        except TypeError as exc:
            raise CasdError(f"{not_a_package}: {exc}") from None
        if not (len(package.class_names) == len(package.class_colors) > 0
                and len(package.bands) == len(package.mean) == len(package.std) > 0
                and package.input_size > 0 and package.value_scale > 0
                and package.temperature > 0):
            raise CasdError(f"{not_a_package}: its class or band description is inconsistent")
        return package


def _float32(tensor: "torch.Tensor") -> "torch.Tensor":
    return tensor.float() if tensor.is_floating_point() else tensor


def default_model_path() -> Path:
    """The embedded default model shipped in ``resources/`` (override: ``CASD_DEFAULT_MODEL``):
    the ``.safetensors`` package where torch is installed, else its ``.onnx`` export."""
    override = os.environ.get("CASD_DEFAULT_MODEL")
    if override:
        return Path(override)
    suffix = ".safetensors" if torch_available() else ".onnx"
    return Path(__file__).resolve().parent.parent / "resources" / "models" / f"{DEFAULT_MODEL}{suffix}"
