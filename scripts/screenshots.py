"""Screenshots of the plugin in the real QGIS desktop: docs/images/dialog.png and result.png.

Run it with the project's Python (the venv that has torch and rasterio):

    .venv/bin/python scripts/screenshots.py [--model PACKAGE.safetensors] [--out docs/images]

It starts the QGIS desktop under Xvfb with a throw-away profile in which the plugin is enabled
(the repository is linked into a temporary plugins folder, found through QGIS_PLUGINPATH), and
hands QGIS this same file as ``--code``. Inside QGIS the file loads ``test_tiled.tif``, clicks
the plugin's toolbar button, photographs the dialog, presses Run, waits for the categorised
result layer and photographs the window. Without ``--model`` the embedded default model is used.
"""

from __future__ import annotations

import os
import sys

PLUGIN_NAME = "casd_scene_classifier"
RASTER = "test_tiled.tif"


# --- outside QGIS: set up a profile and run the desktop under Xvfb -------------------------------

def launch() -> int:
    import argparse
    import shutil
    import site
    import subprocess
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model package to use instead of the embedded default model")
    parser.add_argument("--out", default=str(repo / "docs" / "images"), help="folder for the PNGs")
    parser.add_argument("--data", default=os.environ.get("CASD_DATA", str(repo.parent / "shared" / "data")),
                        help="the shared data folder (holds rasters/test_tiled.tif)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds before QGIS is stopped")
    args = parser.parse_args()

    raster = Path(args.data) / "rasters" / RASTER
    if not raster.is_file():
        parser.error(f"{raster} not found; pass --data or set CASD_DATA")
    for tool in ("xvfb-run", "qgis"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt install xvfb qgis)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dialog.png", "result.png"):
        (out / name).unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="casd-screenshots-") as scratch:
        scratch = Path(scratch)
        (scratch / "plugins").mkdir()
        (scratch / "plugins" / PLUGIN_NAME).symlink_to(repo, target_is_directory=True)
        settings = scratch / "profiles" / "default" / "QGIS"
        settings.mkdir(parents=True)
        (settings / "QGIS3.ini").write_text(
            "[PythonPlugins]\n"
            f"{PLUGIN_NAME}=true\n"
            "processing=true\n"
            "[qgis]\n"
            "showTips=false\n"
            "checkVersion=false\n"
            "allowVersionCheck=false\n"
            "[app]\n"
            "plugin_installer\\checkOnStart=false\n"
            "plugin_installer\\allowExperimental=true\n"
            "[core]\n"
            "NewsFeed\\httpsfeedqgisorg\\disabled=true\n",
            encoding="utf-8")
        env = dict(os.environ)
        # QGIS embeds the system Python: show it this environment's packages (torch, rasterio, ...).
        packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(packages + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else packages)
        env.update(QGIS_PLUGINPATH=str(scratch / "plugins"), CASD_SCREENSHOT_RASTER=str(raster),
                   CASD_SCREENSHOT_OUT=str(out), CASD_SCREENSHOT_MODEL=args.model or "",
                   XDG_RUNTIME_DIR=str(scratch), HOME=str(scratch), QT_QPA_PLATFORM="xcb")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--profiles-path", str(scratch),
                   "--nologo", "--noversioncheck", "--code", str(Path(__file__).resolve())]
        try:
            subprocess.run(command, env=env, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"QGIS did not finish within {args.timeout} s", file=sys.stderr)
    missing = [name for name in ("dialog.png", "result.png") if not (out / name).is_file()]
    if missing:
        print(f"screenshots missing: {', '.join(missing)}; see QGIS's output above", file=sys.stderr)
        return 1
    print(f"wrote {out / 'dialog.png'} and {out / 'result.png'}")
    return 0


# --- inside QGIS: drive the GUI one timer step at a time (the GUI thread must never block) ------

def capture() -> None:
    from qgis.core import Qgis, QgsMessageLog, QgsProject, QgsRasterLayer
    from qgis.PyQt.QtCore import QObject, QTimer
    from qgis.PyQt.QtWidgets import QApplication, QDockWidget
    from qgis.utils import iface

    out = os.environ["CASD_SCREENSHOT_OUT"]
    model = os.environ.get("CASD_SCREENSHOT_MODEL", "")
    state = {"dialog": None, "polls": 0}

    def log(message: str) -> None:
        print(f"[screenshots] {message}", flush=True)
        QgsMessageLog.logMessage(message, "CASD screenshots", Qgis.MessageLevel.Info)

    def finish(code: int = 0) -> None:
        log("done" if code == 0 else "failed")
        QgsProject.instance().clear()  # no "save changes?" question, no layer teardown during exit
        QTimer.singleShot(500, iface.actionExit().trigger)

    def later(step, ms: int = 500) -> None:
        def guarded() -> None:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - report and quit instead of hanging Xvfb
                import traceback

                log(f"error: {exc}\n{traceback.format_exc()}")
                finish(1)
        QTimer.singleShot(ms, guarded)

    def load_raster() -> None:
        window = iface.mainWindow()
        window.resize(1600, 1000)
        window.showMaximized()
        for dock in window.findChildren(QDockWidget):
            if dock.objectName() == "Browser":  # leave the height to the layer legend
                dock.hide()
        raster = QgsRasterLayer(os.environ["CASD_SCREENSHOT_RASTER"], "test_tiled (RGB, 0.25 m)")
        if not raster.isValid():
            raise RuntimeError("the raster did not load")
        QgsProject.instance().addMapLayer(raster)
        iface.setActiveLayer(raster)
        iface.mapCanvas().setDestinationCrs(raster.crs())
        iface.mapCanvas().setExtent(raster.extent())
        later(click_toolbar_button, 3000)

    def click_toolbar_button() -> None:
        # Looked up by name as a QObject: QAction is in QtWidgets in Qt 5 but in QtGui in Qt 6.
        action = iface.mainWindow().findChild(QObject, "CasdClassifyRasterAction")
        if action is None:
            import qgis.utils
            raise RuntimeError("the plugin's toolbar button is missing: is the plugin enabled? "
                               f"(active plugins: {qgis.utils.active_plugins})")
        later(fill_dialog, 3000)
        action.trigger()  # opens the modal Processing dialog; the timer above runs inside it

    def fill_dialog() -> None:
        # Under Xvfb without a window manager nothing is "active": look for the visible dialog.
        dialogs = [w for w in QApplication.topLevelWidgets()
                   if w.isVisible() and type(w).__name__ == "AlgorithmDialog"]
        if not dialogs:
            shown = [type(w).__name__ for w in QApplication.topLevelWidgets() if w.isVisible()]
            raise RuntimeError(f"the algorithm dialog did not open (visible: {shown})")
        dialog = dialogs[0]
        state["dialog"] = dialog
        raster = QgsProject.instance().mapLayersByName("test_tiled (RGB, 0.25 m)")[0]
        parameters = {"INPUT": raster}
        if model:
            parameters["MODEL"] = model
        dialog.setParameters(parameters)
        dialog.resize(1100, 760)
        later(photograph_dialog, 1500)

    def photograph_dialog() -> None:
        state["dialog"].grab().save(os.path.join(out, "dialog.png"))
        log("dialog.png saved")
        state["dialog"].runButton().click()
        later(wait_for_result, 2000)

    def wait_for_result() -> None:
        layers = [layer for layer in QgsProject.instance().mapLayers().values() if layer.name() == "Scene classes"]
        state["polls"] += 1
        if not layers:
            if state["polls"] > 240:
                raise RuntimeError("no result layer after two minutes")
            later(wait_for_result, 500)
            return
        log(f"result: {layers[0].featureCount()} tiles, renderer {layers[0].renderer().type()}")
        state["dialog"].close()
        raster_node = QgsProject.instance().layerTreeRoot().findLayer(
            QgsProject.instance().mapLayersByName("test_tiled (RGB, 0.25 m)")[0].id())
        raster_node.setExpanded(False)  # its band legend says nothing here
        canvas = iface.mapCanvas()
        canvas.setExtent(QgsProject.instance().mapLayersByName("test_tiled (RGB, 0.25 m)")[0].extent())
        canvas.zoomByFactor(1.08)
        canvas.refreshAllLayers()
        later(photograph_result, 4000)

    def photograph_result() -> None:
        if iface.mapCanvas().isDrawing():
            later(photograph_result, 500)
            return
        iface.mainWindow().grab().save(os.path.join(out, "result.png"))
        log("result.png saved")
        finish(0)

    later(load_raster, 2000)


if __name__ == "__main__":
    if "qgis.utils" in sys.modules and getattr(sys.modules["qgis.utils"], "iface", None) is not None:
        capture()
    else:
        sys.exit(launch())
