"""The plugin's code is written for Qt 5 and Qt 6 at once (QGIS 3.22 up to QGIS 4).

What Qt 6 / PyQt6 removes, and what this file therefore rejects in ``plugin/``, the root
``__init__.py`` and ``scripts/screenshots.py`` (QGIS's own ``pyqt5_to_pyqt6`` migration rewrites
the same things):

- imports of ``PyQt5``/``PyQt6``/``sip`` instead of ``qgis.PyQt`` (QGIS picks the binding);
- ``exec_()`` (PyQt6 has only ``exec()``);
- enum members reached through their class, ``Qt.AlignLeft`` or ``QgsWkbTypes.Polygon``:
  PyQt6 only knows them through their enum, ``Qt.AlignmentFlag.AlignLeft``;
- ``QVariant`` field types (Qt 6 has no ``QVariant.Type``; QGIS 3.38+ takes ``QMetaType.Type``)
  and ``QAction`` from ``QtWidgets`` (Qt 6 moved it to ``QtGui``), except in
  ``plugin/compat.py``, which picks the right one for the running QGIS once;
- Qt 5-only classes (``QRegExp``, ``QDesktopWidget``, ``QtWebKit``).

How the readiness was checked (QGIS 3.22.16 / PyQt 5.15.9 here; no QGIS 4 build installs on
Debian 12): every scoped spelling the plugin uses was evaluated in QGIS 3.22's Python
(``Qt.TextInteractionFlag.TextSelectableByMouse``, ``QMessageBox.Icon.Warning``,
``QMessageBox.StandardButton.Ok``, ``QgsProcessingParameterFile.Behavior.File``,
``QgsProcessingParameterNumber.Type.Double``, ``QgsProcessingParameterDefinition.Flag.FlagAdvanced``,
``QgsProcessing.SourceType.TypeVectorPolygon``, ``QgsWkbTypes.Type.Polygon``,
``Qgis.MessageLevel.Warning``, ``QgsFeatureSink.Flag.FastInsert``, ``QEvent.Type.DeferredDelete``,
``QgsProcessingGui.WidgetType.Standard``): all exist there, and the plugin tests run with them.
Only ``QgsField(name, QMetaType.Type.Int)`` is refused by 3.22 and ``QtGui.QAction`` is missing
there, hence ``plugin/compat.py``. The Qt spellings (enums, ``exec()``, ``QtGui.QAction``,
``QMetaType.Type.QString``, ``findChild(QObject, name)``) were run in PyQt6 6.11 from PyPI. For the
QGIS enums that later releases moved into ``Qgis`` (``Qgis.WkbType``,
``Qgis.ProcessingSourceType``, ...), QGIS keeps the old class-scoped names as aliases
(``QgsWkbTypes.Type = Qgis.WkbType`` in its generated ``auto_additions``), so the spellings
above stay valid on QGIS 4. This scan is plain Python (``ast``), no QGIS needed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "plugin" / "compat.py"

# Classes whose enum members PyQt6 only reaches through the enum (Class.Enum.Member).
SCOPED_CLASSES = re.compile(
    r"^(Qt|QMessageBox|QDialogButtonBox|QEvent|QMetaType|QVariant|QSizePolicy|QFrame|QAbstractItemView|"
    r"QHeaderView|QLineEdit|QPalette|QFont|QIcon|QPainter|QKeySequence|QIODevice|"
    r"Qgis|QgsProcessing|QgsProcessingParameter\w*|QgsProcessingAlgorithm|QgsProcessingGui|"
    r"QgsProcessingContext|QgsProcessingOutput\w*|QgsWkbTypes|QgsFeatureSink|QgsFeatureRequest|"
    r"QgsMapLayer|QgsVectorLayer|QgsRasterLayer|QgsMapLayerProxyModel|QgsField|QgsFields)$")
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")  # Qgis.QGIS_VERSION_INT, QgsProcessing.TEMPORARY_OUTPUT
DIRECT_BINDINGS = ("PyQt5", "PyQt6", "PySide2", "PySide6", "sip")
QT5_ONLY = {"QRegExp", "QRegExpValidator", "QDesktopWidget", "QtWebKit", "QtWebKitWidgets"}
MOVED_TO_QTGUI = {"QAction", "QActionGroup", "QShortcut", "QUndoCommand", "QUndoStack", "QFileSystemModel"}


def _class_name(node: ast.expr) -> str | None:
    """``Qt`` for ``Qt`` and for ``QtCore.Qt``; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def qt6_problems(source: str, path: str = "<source>", compat: bool = False) -> list[str]:
    """Every spelling in ``source`` that Qt 6 rejects, as ``path:line: what``."""
    tree = ast.parse(source, path)
    problems = []
    namespaces = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
            names = {alias.name for alias in node.names}
            if (node.module or "").endswith("QtWidgets") and names & MOVED_TO_QTGUI and not compat:
                problems.append(f"{where}: {', '.join(sorted(names & MOVED_TO_QTGUI))} is in QtGui in Qt 6; "
                                "take it from plugin/compat.py")
            if names & QT5_ONLY:
                problems.append(f"{where}: {', '.join(sorted(names & QT5_ONLY))} does not exist in Qt 6")
        else:
            modules = []
        for module in modules:
            if module.split(".")[0] in DIRECT_BINDINGS:
                problems.append(f"{where}: imports {module}; use qgis.PyQt")
            if module.split(".")[-1] in QT5_ONLY:
                problems.append(f"{where}: {module} does not exist in Qt 6")
        if isinstance(node, ast.Attribute):
            owner = _class_name(node.value)
            if node.attr == "exec_":
                problems.append(f"{where}: exec_() is exec() in Qt 6")
            elif owner == "QVariant" and not compat:
                problems.append(f"{where}: QVariant.{node.attr}: Qt 6 has no QVariant types; "
                                "use plugin/compat.py's FIELD_* types")
            elif (owner and SCOPED_CLASSES.match(owner) and node.attr[:1].isupper()
                  and not CONSTANT.match(node.attr) and id(node) not in namespaces):
                problems.append(f"{where}: {owner}.{node.attr} is not scoped by its enum "
                                f"(e.g. {owner}.<EnumName>.{node.attr})")
    return problems


def _sources() -> list[Path]:
    return sorted((REPO / "plugin").rglob("*.py")) + [REPO / "__init__.py", REPO / "scripts" / "screenshots.py"]


@pytest.mark.parametrize("path", _sources(), ids=lambda path: str(path.relative_to(REPO)))
def test_the_plugin_is_written_for_qt5_and_qt6(path):
    problems = qt6_problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)), compat=path == COMPAT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("bad", [
    "from PyQt5.QtCore import Qt",
    "import PyQt5.QtWidgets",
    "dialog.exec_()",
    "box.setTextInteractionFlags(Qt.TextSelectableByMouse)",
    "QMessageBox(QMessageBox.Warning, 'a', 'b')",
    "level = Qgis.Warning",
    "QgsProcessingParameterNumber(name, label, type=QgsProcessingParameterNumber.Double)",
    "param.flags() | QgsProcessingParameterDefinition.FlagAdvanced",
    "QgsProcessing.TypeVectorPolygon",
    "QgsWkbTypes.Polygon",
    "sink.addFeatures(features, QgsFeatureSink.FastInsert)",
    "QgsField('a', QVariant.Int)",
    "QgsField('a', QVariant.Type.Int)",
    "QtCore.Qt.AlignLeft",
    "from qgis.PyQt.QtWidgets import QAction",
    "from qgis.PyQt.QtCore import QRegExp",
])
def test_the_scan_catches_qt5_spellings(bad):
    assert qt6_problems(bad)


@pytest.mark.parametrize("good", [
    "from qgis.PyQt.QtCore import Qt",
    "dialog.exec()",
    "box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)",
    "QMessageBox(QMessageBox.Icon.Warning, 'a', 'b', QMessageBox.StandardButton.Ok)",
    "level = Qgis.MessageLevel.Warning",
    "QgsProcessingParameterNumber.Type.Double",
    "QgsProcessingParameterDefinition.Flag.FlagAdvanced",
    "QgsProcessing.SourceType.TypeVectorPolygon",
    "QgsWkbTypes.Type.Polygon",
    "QgsFeatureSink.Flag.FastInsert",
    "Qgis.QGIS_VERSION_INT >= 33800",
    "QgsProcessing.TEMPORARY_OUTPUT",
    "QMessageBox.warning(None, 'a', 'b')",
    "sys.exec_prefix",
    "from qgis.PyQt.QtGui import QAction",
])
def test_the_scan_passes_qt6_spellings(good):
    assert qt6_problems(good) == []
