"""The Processing provider ``casd``: one algorithm per job, all thin faces over casd_core."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .icons import ICON_SVG

PROVIDER_ID = "casd"


class CasdProvider(QgsProcessingProvider):
    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "CASD scene classification"

    def longName(self) -> str:
        return "CASD scene classification (Class-Aware Self-Distillation)"

    def icon(self) -> QIcon:
        return QIcon(ICON_SVG)

    def svgIconPath(self) -> str:
        return ICON_SVG

    def loadAlgorithms(self) -> None:
        from casd_core.backend import torch_available

        from .algorithms import ALGORITHMS, TORCH_ONLY

        for algorithm in ALGORITHMS:
            if algorithm in TORCH_ONLY and not torch_available():
                continue
            self.addAlgorithm(algorithm())
