"""The QGIS face of casd_core: Processing provider, algorithms, toolbar and styling."""
