"""What the four algorithms share: group, icon, the model and device parameters, error mapping.

casd_core is imported inside the methods that need it: importing an algorithm module never
fails, and only ``train`` loads torch when the provider loads (it lists the core's backbones).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qgis.core import (QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingParameterEnum,
                       QgsProcessingParameterFile, QgsProcessingParameterDefinition)
from qgis.PyQt.QtGui import QIcon

from ..deps import qgis_python
from ..icons import ICON_SVG

DEVICES = ("auto", "cpu", "cuda")
MODEL_FILTER = "CASD model package (*.safetensors)"


class CasdAlgorithm(QgsProcessingAlgorithm):
    """Base of the provider's algorithms; subclasses define the job."""

    def group(self) -> str:
        return "Scene classification"

    def groupId(self) -> str:  # noqa: N802 (QGIS's name)
        return "sceneclassification"

    def icon(self) -> QIcon:
        return QIcon(ICON_SVG)

    def svgIconPath(self) -> str:  # noqa: N802 (QGIS's name)
        return ICON_SVG

    def createInstance(self) -> "CasdAlgorithm":  # noqa: N802 (QGIS's name)
        return type(self)()

    # -- shared parameters --------------------------------------------------------------------

    def add_model_parameter(self, name: str) -> None:
        self.addParameter(QgsProcessingParameterFile(
            name, "Model package (empty: the embedded default model)",
            behavior=QgsProcessingParameterFile.File, fileFilter=MODEL_FILTER, optional=True))

    def model_path(self, parameters: dict, name: str, context) -> Path:
        """The chosen model file, or the embedded default model when none is given."""
        from casd_core.errors import CasdError
        from casd_core.package import default_model_path

        chosen = self.parameterAsFile(parameters, name, context)
        path = Path(chosen) if chosen else default_model_path()
        if not chosen and not path.is_file():
            raise CasdError(f"the embedded default model is missing ({path}); choose a model file, "
                            "or train one with 'Train a scene classifier'")
        return path

    def add_device_parameter(self, name: str) -> None:
        param = QgsProcessingParameterEnum(name, "Device (auto: a CUDA GPU when there is one)",
                                           options=list(DEVICES), defaultValue=0)
        advanced(param)
        self.addParameter(param)

    def device(self, parameters: dict, name: str, context) -> str:
        return DEVICES[self.parameterAsEnum(parameters, name, context)]


def advanced(param: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def use_python_for_child_processes() -> None:
    """Data-loader workers are child processes. Where they are spawned rather than forked
    (Windows, macOS), multiprocessing must start Python itself, not the QGIS executable this
    interpreter is embedded in (the embedder's duty, per the multiprocessing docs)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        multiprocessing.set_executable(qgis_python())


@contextmanager
def user_errors() -> Iterator[None]:
    """casd_core's user-facing errors (a cancel included) become Processing errors, without traceback."""
    from casd_core.errors import CasdError

    try:
        yield
    except CasdError as exc:
        raise QgsProcessingException(str(exc)) from None
