"""What the four algorithms share: group, icon, the model and device parameters, error mapping.

casd_core is imported inside the methods that need it, so importing an algorithm module never
fails; ``initAlgorithm`` imports the core's configs and lists to take their defaults and choices
from them (which loads torch when the provider loads, only after the plugin found it installed).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from qgis.core import (QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingParameterEnum,
                       QgsProcessingParameterFile, QgsProcessingParameterDefinition)
from qgis.PyQt.QtGui import QIcon

from ..deps import qgis_python
from ..icons import ICON_SVG

DEVICES = ("auto", "cpu", "cuda")
MODEL_FILTER = "CASD model (*.safetensors *.onnx)"


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
            behavior=QgsProcessingParameterFile.Behavior.File, fileFilter=MODEL_FILTER, optional=True))

    def model_path(self, parameters: dict, name: str, context) -> Path:
        """The chosen model file, or the embedded default model when none is given."""
        from casd_core.errors import CasdError, param
        from casd_core.package import default_model_path

        chosen = self.parameterAsFile(parameters, name, context)
        path = Path(chosen) if chosen else default_model_path()
        if not chosen and not path.is_file():
            raise CasdError(f"the embedded default model is missing ({path}); choose a {param('model')} "
                            "file, or train one with 'Train a scene classifier'")
        return path

    def add_device_parameter(self, name: str) -> None:
        param = QgsProcessingParameterEnum(name, "Device (auto: a CUDA GPU when there is one)",
                                           options=list(DEVICES), defaultValue=0)
        advanced(param)
        self.addParameter(param)

    def device(self, parameters: dict, name: str, context) -> str:
        return DEVICES[self.parameterAsEnum(parameters, name, context)]


def advanced(param: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
    return param


def use_python_for_child_processes() -> None:
    """Data-loader workers are child processes. Where they are spawned rather than forked
    (Windows, macOS), multiprocessing must start Python itself, not the QGIS executable this
    interpreter is embedded in (the embedder's duty, per the multiprocessing docs)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        multiprocessing.set_executable(qgis_python())


def label(definition: QgsProcessingParameterDefinition) -> str:
    """A parameter's name as the dialog shows it: its description up to the first " (" ."""
    return definition.description().split(" (")[0]


def dialog_names(algorithm: QgsProcessingAlgorithm,
                 parameter_of: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """``name_of(key)`` for :meth:`CasdError.render`: a core setting (a config field name such as
    ``tile_size``) as the label of the parameter that sets it, in double quotes ("Tile size").

    The parameter is ``parameter_of[key]``, else ``key.upper()``; a setting the dialog has no
    parameter for is named by its key, with spaces for underscores.
    """
    parameter_of = parameter_of or {}

    def name_of(key: str) -> str:
        definition = algorithm.parameterDefinition(parameter_of.get(key, key.upper()))
        return f'"{label(definition)}"' if definition is not None else key.replace("_", " ")

    return name_of


@contextmanager
def user_errors(algorithm: QgsProcessingAlgorithm,
                parameter_of: Mapping[str, str] | None = None) -> Iterator[None]:
    """casd_core's user-facing errors (a cancel included) become Processing errors, without
    traceback, naming settings as ``algorithm``'s dialog does (see :func:`dialog_names`)."""
    from casd_core.errors import CasdError

    try:
        yield
    except CasdError as exc:
        raise QgsProcessingException(exc.render(dialog_names(algorithm, parameter_of))) from None
