"""The plugin class QGIS instantiates: a toolbar button, a Raster menu entry and the provider."""

from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QMessageBox

from .compat import QAction
from .deps import keep_triton_out, missing_message, missing_requirements
from .icons import ICON_SVG

PLUGIN_NAME = "CASD Scene Classifier"
MENU = "&CASD Scene Classifier"
TOOLBAR_OBJECT_NAME = "CasdSceneClassifierToolbar"
ACTION_OBJECT_NAME = "CasdClassifyRasterAction"
CLASSIFY_ALGORITHM = "casd:classifyraster"
LOG_TAG = "CASD"


class CasdPlugin:
    """Owns exactly what :meth:`unload` removes: one action, its toolbar and menu entry, the provider."""

    def __init__(self, iface) -> None:
        keep_triton_out()  # before anything imports torch
        self.iface = iface
        self.provider = None
        self.action: QAction | None = None
        self.toolbar = None
        self.missing: list[str] = []

    # -- Processing (also called alone by qgis_process) -----------------------------------------

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        if self.provider is not None:
            return
        self.missing = missing_requirements()
        if self.missing:
            QgsMessageLog.logMessage(missing_message(self.missing), LOG_TAG, Qgis.MessageLevel.Warning)
            return
        from .provider import CasdProvider

        self.provider = CasdProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    # -- GUI ------------------------------------------------------------------------------------

    def initGui(self) -> None:  # noqa: N802 (QGIS's name)
        self.initProcessing()
        window = self.iface.mainWindow()
        self.action = QAction(QIcon(ICON_SVG), "Classify Raster Scenes…", window)
        self.action.setObjectName(ACTION_OBJECT_NAME)
        self.action.setToolTip("Label every tile of a raster with its scene class (CASD)")
        self.action.triggered.connect(self.open_classify_dialog)
        self.toolbar = self.iface.addToolBar(PLUGIN_NAME)
        self.toolbar.setObjectName(TOOLBAR_OBJECT_NAME)
        self.toolbar.addAction(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)
        if self.missing:
            self.iface.messageBar().pushMessage(
                PLUGIN_NAME, "Python packages are missing; the algorithms are unavailable until they are installed.",
                missing_message(self.missing), Qgis.MessageLevel.Warning, 0)

    def open_classify_dialog(self) -> None:
        """The toolbar and the Processing toolbox open the same algorithm dialog."""
        if self.missing:
            self._show_missing_dependencies()
            return
        import processing

        processing.execAlgorithmDialog(CLASSIFY_ALGORITHM)

    def _show_missing_dependencies(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Warning, PLUGIN_NAME, missing_message(self.missing),
                          QMessageBox.StandardButton.Ok, self.iface.mainWindow())
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)  # so the command can be copied
        box.exec()

    def unload(self) -> None:
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.action.deleteLater()
            self.action = None
        if self.toolbar is not None:
            self.iface.mainWindow().removeToolBar(self.toolbar)
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        from .styling import release_stylers

        release_stylers()
