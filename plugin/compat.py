"""The few names that QGIS 3.22 (Qt 5) and QGIS 4 (Qt 6) spell differently, resolved once.

Everything else the plugin uses is written so that both accept it: fully scoped enums
(``QMessageBox.Icon.Warning``), ``exec()``, ``qgis.PyQt`` imports. ``tests/test_qt6_ready.py``
keeps it that way and allows the Qt 5 spellings below in this file only.
"""

from __future__ import annotations

from qgis.core import Qgis

try:
    from qgis.PyQt.QtGui import QAction  # Qt 6 moved QAction to QtGui
except ImportError:
    from qgis.PyQt.QtWidgets import QAction  # Qt 5

# Attribute types of a QgsField: QGIS 3.38 and later take QMetaType.Type (Qt 6 has no
# QVariant.Type); QGIS 3.22 to 3.36 take only QVariant.Type.
if Qgis.QGIS_VERSION_INT >= 33800:
    from qgis.PyQt.QtCore import QMetaType

    FIELD_INT, FIELD_INT64, FIELD_DOUBLE, FIELD_STRING = (
        QMetaType.Type.Int, QMetaType.Type.LongLong, QMetaType.Type.Double, QMetaType.Type.QString)
else:
    from qgis.PyQt.QtCore import QVariant

    FIELD_INT, FIELD_INT64, FIELD_DOUBLE, FIELD_STRING = (
        QVariant.Type.Int, QVariant.Type.LongLong, QVariant.Type.Double, QVariant.Type.String)

__all__ = ["FIELD_DOUBLE", "FIELD_INT", "FIELD_INT64", "FIELD_STRING", "QAction"]
