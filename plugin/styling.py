"""The result layer's look: categorised by class, in the model's colours, class names in the legend.

The style itself is casd_core's (``vectorio.qml_style``, the one the CLI stores in its
GeoPackages), so a layer looks the same whichever face wrote it; here it is applied to a layer
in the project, keeping only the classes that occur. Styling runs on the main thread, after the
algorithm: a layer post-processor that QGIS calls when it adds the output layer to the project.
"""

from __future__ import annotations

from qgis.core import (QgsCategorizedSymbolRenderer, QgsProcessingContext,
                       QgsProcessingLayerPostProcessorInterface, QgsVectorLayer)
from qgis.PyQt.QtXml import QDomDocument

# QgsProcessingContext does not own post-processors; they live here until the plugin unloads.
_stylers: list["ClassStyler"] = []


def apply_class_style(layer: QgsVectorLayer, qml: str) -> None:
    """Apply the package's categorised style, with one category per class present in ``layer``."""
    document = QDomDocument()
    document.setContent(qml)
    ok, error = layer.importNamedStyle(document)
    if not ok:
        raise ValueError(f"the class style could not be applied: {error}")
    if isinstance(layer.renderer(), QgsCategorizedSymbolRenderer):
        renderer = layer.renderer().clone()
        present = {str(value) for value in layer.uniqueValues(layer.fields().indexOf(renderer.classAttribute()))}
        for index in reversed(range(len(renderer.categories()))):
            if str(renderer.categories()[index].value()) not in present:
                renderer.deleteCategory(index)
        layer.setRenderer(renderer)  # (re)setting it tells the legend to refresh
    layer.triggerRepaint()


class ClassStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles the output layer by class once QGIS has loaded it."""

    def __init__(self, qml: str) -> None:
        super().__init__()
        self.qml = qml

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 (QGIS's name)
        if not isinstance(layer, QgsVectorLayer):
            return
        apply_class_style(layer, self.qml)
        project = context.project()
        node = project.layerTreeRoot().findLayer(layer.id()) if project is not None else None
        if node is not None:
            node.setExpanded(True)  # the legend lists the classes


def style_when_loaded(context: QgsProcessingContext, layer_id: str, qml: str) -> None:
    """Arrange for the output ``layer_id`` to be styled by class if QGIS loads it into the project."""
    if not context.willLoadLayerOnCompletion(layer_id):
        return
    styler = ClassStyler(qml)
    _stylers.append(styler)
    context.layerToLoadOnCompletionDetails(layer_id).setPostProcessor(styler)


def release_stylers() -> None:
    _stylers.clear()
