"""The plugin loads as QGIS loads it, registers its provider, and unload() leaves nothing behind."""

from __future__ import annotations

import configparser
import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qgis

REPO = Path(__file__).resolve().parents[2]

ALGORITHM_IDS = ("casd:classifyraster", "casd:classifyfolder", "casd:makechips", "casd:train", "casd:evaluate",
                 "casd:trainfrompolygons", "casd:exportonnx")


def _flush_deferred_deletes() -> None:
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def _casd_widgets(iface) -> dict[str, list]:
    from qgis.PyQt.QtWidgets import QToolBar

    try:
        from qgis.PyQt.QtGui import QAction  # Qt 6
    except ImportError:
        from qgis.PyQt.QtWidgets import QAction  # Qt 5

    window = iface.mainWindow()
    return {
        "toolbars": [t for t in window.findChildren(QToolBar) if "Casd" in t.objectName()],
        "actions": [a for a in window.findChildren(QAction) if "Casd" in a.objectName()],
        "menus": [a.text() for a in iface.rasterMenu().actions() if "CASD" in a.text()],
    }


def test_metadata_is_complete_for_the_plugin_repository():
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "metadata.txt", encoding="utf-8")
    general = metadata["general"]
    for key in ("name", "qgisMinimumVersion", "qgisMaximumVersion", "description", "about", "version",
                "author", "email", "repository", "tracker", "homepage", "category", "icon", "tags",
                "changelog", "hasProcessingProvider"):
        assert general.get(key, "").strip(), f"metadata.txt lacks {key}"
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["hasProcessingProvider"] == "yes"
    assert (REPO / general["icon"]).is_file()
    assert "pip install" in general["about"]


def test_provider_and_its_algorithms_are_registered(provider):
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    assert provider.id() == "casd"
    for algorithm_id in ALGORITHM_IDS:
        algorithm = registry.algorithmById(algorithm_id)
        assert algorithm is not None, algorithm_id
        assert algorithm.shortHelpString().strip()
        assert algorithm.group() and algorithm.groupId()
    assert sorted(a.id() for a in provider.algorithms()) == sorted(ALGORITHM_IDS)


def test_init_gui_adds_one_button_and_menu_entry_and_unload_removes_everything(iface, provider, plugin_name):
    import qgis.utils
    from qgis.core import QgsApplication

    loaded = _casd_widgets(iface)
    assert len(loaded["toolbars"]) == 1 and len(loaded["actions"]) == 1 and len(loaded["menus"]) == 1
    toolbar_actions = loaded["toolbars"][0].actions()
    assert loaded["actions"][0] in toolbar_actions
    assert not loaded["actions"][0].icon().isNull()

    assert qgis.utils.unloadPlugin(plugin_name)
    _flush_deferred_deletes()
    assert _casd_widgets(iface) == {"toolbars": [], "actions": [], "menus": []}
    assert QgsApplication.processingRegistry().providerById("casd") is None
    assert not [name for name in sys.modules if name.startswith(plugin_name)]

    # Load it again, as QGIS does when the plugin is re-enabled, for the tests that follow.
    assert qgis.utils.loadPlugin(plugin_name) and qgis.utils.startPlugin(plugin_name)
    assert QgsApplication.processingRegistry().providerById("casd") is not None
    assert len(_casd_widgets(iface)["toolbars"]) == 1


def test_missing_dependencies_still_load_and_say_how_to_install(iface, provider, plugin_name, monkeypatch):
    import qgis.utils
    from qgis.core import QgsApplication

    package = qgis.utils.plugins[plugin_name].__module__.rsplit(".", 1)[0]  # <plugin>.plugin
    deps = importlib.import_module(f"{package}.deps")
    main = importlib.import_module(f"{package}.main")
    monkeypatch.setitem(deps.REQUIREMENTS, "casd_no_such_module",
                        ("casd-no-such-module", "1.0", "casd-no-such-module>=1.0"))
    casd_provider = QgsApplication.processingRegistry().providerById("casd")
    shown_before = len(iface.messageBar().items())

    broken = main.CasdPlugin(iface)
    broken.initGui()
    try:
        assert broken.provider is None
        assert broken.missing == ["casd-no-such-module>=1.0"]
        assert len(iface.messageBar().items()) == shown_before + 1
        command = deps.install_command(broken.missing)
        assert " -m pip install " in command and command.endswith("'casd-no-such-module>=1.0' 'numpy<2'")
        assert command in deps.missing_message(broken.missing)
        # the working instance's provider is untouched
        assert QgsApplication.processingRegistry().providerById("casd") is casd_provider
    finally:
        broken.unload()
        iface.messageBar().clearWidgets()
    _flush_deferred_deletes()
    assert len(_casd_widgets(iface)["toolbars"]) == 1  # only the working instance's toolbar is left


@pytest.mark.parametrize("algorithm_id", ALGORITHM_IDS)
def test_every_parameter_has_a_widget_in_the_dialog_the_batch_dialog_and_the_modeler(provider, algorithm_id):
    from qgis.core import QgsApplication
    from qgis.gui import QgsGui, QgsProcessingGui

    algorithm = QgsApplication.processingRegistry().algorithmById(algorithm_id)
    registry = QgsGui.processingGuiRegistry()
    for parameter in algorithm.parameterDefinitions():
        for mode in (QgsProcessingGui.WidgetType.Standard, QgsProcessingGui.WidgetType.Batch,
                     QgsProcessingGui.WidgetType.Modeler):
            assert registry.createParameterWidgetWrapper(parameter, mode) is not None, (parameter.name(), mode)


def test_the_batch_dialog_opens_for_classify_raster(iface, provider):
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from qgis.core import QgsApplication

    algorithm = QgsApplication.processingRegistry().createAlgorithmById("casd:classifyraster")
    dialog = BatchAlgorithmDialog(algorithm, parent=iface.mainWindow())
    try:
        panel = dialog.mainWidget()
        assert panel.batchRowCount() >= 1
    finally:
        dialog.close()
        dialog.deleteLater()


def test_triton_is_kept_out_of_qgis(plugin_name, monkeypatch):
    """triton's bundled LLVM segfaults the QGIS desktop (which holds Mesa's libLLVM) on import."""
    import qgis.utils

    package = qgis.utils.plugins[plugin_name].__module__.rsplit(".", 1)[0]
    deps = importlib.import_module(f"{package}.deps")
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    deps.keep_triton_out()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    import torch.utils._triton

    torch.utils._triton.has_triton_package.cache_clear()
    assert not torch.utils._triton.has_triton_package()
