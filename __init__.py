"""QGIS entry point of the CASD Scene Classifier plugin (the repository root is the plugin folder)."""

import importlib.util
import os
import sys


def _expose_casd_core() -> None:
    """Make the bundled ``casd_core`` importable under its own name, whatever this folder is called.

    A ``pip install -e .`` (or any installed casd_core) wins, so there is only ever one casd_core.
    """
    if importlib.util.find_spec("casd_core") is None:
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))


def classFactory(iface):  # noqa: N802 (QGIS's name)
    _expose_casd_core()
    # Imported as a package + submodule so that QGIS records (and unloads) both.
    from .plugin import main

    return main.CasdPlugin(iface)
