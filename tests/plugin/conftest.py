"""One real, headless QGIS for the plugin tests, with the plugin loaded the way QGIS loads it.

QGIS is started once per session, before any test of this folder runs, with every settings
folder pointed at a temporary directory (a standalone QgsApplication writes into ``$HOME``).
The repository is symlinked into a temporary plugins folder under another name, so the tests
prove that the plugin does not depend on the folder it is installed in.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN_NAME = "casd_scene_classifier"  # not the repository's folder name, on purpose

try:
    import qgis.core  # noqa: F401
except ImportError as error:  # not QGIS's Python (Debian: a venv on /usr/bin/python3 with --system-site-packages)
    # Every test of this folder then fails (the session fixture below): never skipped, never vanished.
    QGIS_MISSING = (f"QGIS Python bindings not importable ({error}): run bash scripts/setup.sh and "
                    "use .venv/bin/python -m pytest (a venv on Debian's /usr/bin/python3 that sees python3-qgis)")
else:
    QGIS_MISSING = None

_SCRATCH = Path(tempfile.mkdtemp(prefix="casd-qgis-tests-"))


def _isolate_qgis_settings() -> None:
    """Must run before QgsApplication exists: headless, and nothing written outside the scratch dir."""
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    os.environ["QGIS_CUSTOM_CONFIG_PATH"] = str(_SCRATCH / "qgis-config")
    # QGIS reads/writes a QSettings file before it knows its organisation: keep it out of ~/.config.
    # (XDG_CACHE_HOME and XDG_DATA_HOME stay: torch, matplotlib and others keep caches there.)
    for variable, folder in (("XDG_CONFIG_HOME", "config"), ("XDG_RUNTIME_DIR", "runtime")):
        path = _SCRATCH / folder
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ[variable] = str(path)


class FakeIface:
    """The few ``QgisInterface`` methods the plugin uses, backed by real Qt widgets."""

    def __init__(self) -> None:
        from qgis.gui import QgsMapCanvas, QgsMessageBar
        from qgis.PyQt.QtWidgets import QMainWindow

        self._window = QMainWindow()
        self._raster_menu = self._window.menuBar().addMenu("&Raster")
        self._raster_menu.setObjectName("mRasterMenu")
        self._message_bar = QgsMessageBar(self._window)
        self._canvas = QgsMapCanvas(self._window)

    def mainWindow(self):  # noqa: N802
        return self._window

    def messageBar(self):  # noqa: N802
        return self._message_bar

    def mapCanvas(self):  # noqa: N802
        return self._canvas

    def rasterMenu(self):  # noqa: N802
        return self._raster_menu

    def addToolBar(self, name: str):  # noqa: N802
        return self._window.addToolBar(name)

    def addPluginToRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self._submenu(name) or self._raster_menu.addMenu(name)
        menu.addAction(action)

    def removePluginRasterMenu(self, name: str, action) -> None:  # noqa: N802
        menu = self._submenu(name)
        if menu is None:
            return
        menu.removeAction(action)
        if not menu.actions():  # as QGIS does: an empty plugin submenu goes too
            self._raster_menu.removeAction(menu.menuAction())
            menu.deleteLater()

    def _submenu(self, name: str):
        for action in self._raster_menu.actions():
            if action.menu() is not None and action.text() == name:
                return action.menu()
        return None


@pytest.fixture(scope="session", autouse=True)
def qgis_app():
    """The QgsApplication (GUI-capable, offscreen) with Processing initialised."""
    if QGIS_MISSING:
        pytest.fail(QGIS_MISSING, pytrace=False)
    _isolate_qgis_settings()
    from qgis.core import QgsApplication, QgsProject

    app = QgsApplication([], True)
    app.initQgis()
    sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))  # Processing
    from processing.core.Processing import Processing

    Processing.initialize()
    yield app
    QgsProject.instance().removeAllMapLayers()
    gc.collect()  # layers still referenced from Python make exitQgis() segfault
    app.exitQgis()


@pytest.fixture(scope="session")
def iface(qgis_app) -> FakeIface:
    import qgis.utils

    fake = FakeIface()
    qgis.utils.iface = fake
    return fake


@pytest.fixture(scope="session")
def plugins_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / PLUGIN_NAME).symlink_to(REPO, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def plugin_name(iface, plugins_dir) -> str:
    """The plugin, started through ``qgis.utils`` as QGIS does at startup (unloaded at the end)."""
    import qgis.utils

    if str(plugins_dir) not in qgis.utils.plugin_paths:
        qgis.utils.plugin_paths.append(str(plugins_dir))
        sys.path.insert(0, str(plugins_dir))
    qgis.utils.updateAvailablePlugins()
    assert PLUGIN_NAME in qgis.utils.available_plugins
    assert qgis.utils.loadPlugin(PLUGIN_NAME)
    assert qgis.utils.startPlugin(PLUGIN_NAME)
    yield PLUGIN_NAME
    if qgis.utils.isPluginLoaded(PLUGIN_NAME):
        qgis.utils.unloadPlugin(PLUGIN_NAME)


@pytest.fixture
def provider(plugin_name):
    """Looked up per test: a plugin reload replaces the provider object."""
    from qgis.core import QgsApplication

    found = QgsApplication.processingRegistry().providerById("casd")
    assert found is not None, "the plugin did not register the casd provider"
    return found


@pytest.fixture(scope="session")
def rasters(raster_copies: Path) -> Path:
    """Every test here hands its rasters to QGIS, so each gets the temporary copies, not
    ../shared/data (see ``raster_copies``)."""
    return raster_copies


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, aid_root) -> Path:
    """An untrained EfficientNet-Lite0 package over the 30 AID classes (the plumbing, not the accuracy)."""
    import casd_core.models
    from casd_core.package import ModelPackage, default_class_colors

    names = sorted(p.name for p in aid_root.iterdir() if p.is_dir())
    model = casd_core.models.build_model("efficientnet_lite0", len(names), 3, pretrained=None)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ModelPackage(backbone="efficientnet_lite0", class_names=names, class_colors=default_class_colors(names),
                 bands=["red", "green", "blue"], input_size=150, mean=[0.5] * 3, std=[0.5] * 3,
                 tile_footprint_m=120.0, state_dict=model.state_dict()).save(path)
    return path
