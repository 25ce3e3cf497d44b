"""The release ZIP is what plugins.qgis.org accepts, and installs and runs in a fresh QGIS on its own.

``scripts/package_plugin.sh`` builds the ZIP into a temporary folder; its listing and the
plugin repository's checks are asserted here; then a fresh interpreter with a fresh, empty QGIS
profile unpacks it the way *Install from ZIP* does, enables it, classifies a real raster with
the bundled model and unloads it. The editable install of casd_core that this venv has is taken
out of that interpreter first, so the run proves the ZIP carries everything it needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.qgis

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "casd_scene_classifier"
MARKER = "CASD_ZIP_INSTALL_OK"
NEVER_SHIPPED = ("tests/", "docs/", "benchmarks/", "experiments/", "runs/", "scripts/", "dist/", ".ci/",
                 "README.md", "pyproject.toml", "requirements.txt", ".gitignore")


def _packager():
    spec = importlib.util.spec_from_file_location("package_plugin", REPO / "scripts" / "package_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packager():
    return _packager()


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory, packager) -> Path:
    """The ZIP, built by the documented command (``bash scripts/package_plugin.sh --out DIR``)."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(["bash", str(REPO / "scripts" / "package_plugin.sh"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    version = packager.release_version(REPO)
    path = out / f"{PLUGIN}-{version}.zip"
    assert path.is_file() and str(path) in run.stdout
    assert [p.name for p in out.iterdir()] == [path.name]  # no temporary file left beside it
    return path


def test_zip_holds_exactly_the_plugin_and_passes_the_repository_checks(plugin_zip, packager):
    assert packager.repository_errors(plugin_zip) == []
    assert packager.layout_errors(plugin_zip) == []
    with zipfile.ZipFile(plugin_zip) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
    assert all(n.startswith(f"{PLUGIN}/") for n in names)
    inner = {n[len(PLUGIN) + 1:] for n in names}
    assert {n.split("/")[0] for n in inner} == {"metadata.txt", "__init__.py", "LICENSE", "plugin", "casd_core",
                                                "resources"}
    assert not [n for n in inner if n.startswith(NEVER_SHIPPED) or "__pycache__" in n or n.endswith(".pyc")
                or any(part.startswith(".") for part in n.split("/"))]
    assert {"resources/icon.png", "resources/icon.svg", "resources/models/casd_aid_default.safetensors"} <= inner
    # every module of the working tree ships, committed or not (git's ignored files aside)
    for folder in ("casd_core", "plugin"):
        on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert on_disk == {n for n in inner if n.startswith(f"{folder}/") and n.endswith(".py")}, folder
    assert plugin_zip.stat().st_size < packager.PLUGIN_MAX_UPLOAD_SIZE


def _bad_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("change, expected", [
    pytest.param(lambda e: e.pop(f"{PLUGIN}/LICENSE"), "LICENSE", id="no-license"),
    pytest.param(lambda e: e.update({f"{PLUGIN}/plugin/__pycache__/main.cpython-311.pyc": b"x"}), ".pyc", id="pyc"),
    pytest.param(lambda e: e.update({f"{PLUGIN}/.git/config": b"x"}), "'.git'", id="git"),
    pytest.param(lambda e: e.update({"__MACOSX/._metadata.txt": b"x"}), "several top-level", id="macosx"),
    pytest.param(lambda e: e.update({f"{PLUGIN}/lib/fast.so": b"x"}), "binaries", id="binary"),
    pytest.param(lambda e: e.update({f"{PLUGIN}/metadata.txt": b"[general]\nname=x\n"}), "required", id="metadata"),
    pytest.param(lambda e: e.pop(f"{PLUGIN}/resources/icon.png"), "icon", id="no-icon"),
])
def test_the_repository_checks_reject_what_plugins_qgis_org_rejects(plugin_zip, packager, tmp_path, change, expected):
    with zipfile.ZipFile(plugin_zip) as archive:  # the real metadata, small stand-ins for the rest
        entries = {n: (archive.read(n) if n.endswith("metadata.txt") else b"x")
                   for n in archive.namelist() if not n.endswith("/")}
    change(entries)
    errors = packager.repository_errors(_bad_zip(tmp_path / "bad.zip", entries))
    assert any(expected in error for error in errors), errors


def test_bad_folder_name_and_url_are_rejected(plugin_zip, packager, tmp_path):
    with zipfile.ZipFile(plugin_zip) as archive:
        metadata = archive.read(f"{PLUGIN}/metadata.txt").decode()
    metadata = "\n".join("tracker=http://bugs" if line.startswith("tracker=") else line
                         for line in metadata.splitlines())
    entries = {f"Casd Plugin/{n}": b"x" for n in ("__init__.py", "LICENSE", "resources/icon.png")}
    entries["Casd Plugin/metadata.txt"] = metadata.encode()
    errors = packager.repository_errors(_bad_zip(tmp_path / "bad.zip", entries))
    assert any("must start with an ASCII letter" in e for e in errors)
    assert any("PEP 8" in e for e in errors)
    assert any("tracker" in e for e in errors)


def test_the_version_must_be_the_same_in_all_three_files(packager, tmp_path):
    (tmp_path / "casd_core").mkdir()
    (tmp_path / "metadata.txt").write_text("[general]\nversion=0.2.0\n")
    (tmp_path / "casd_core" / "__init__.py").write_text('__version__ = "0.2.0"\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0.2.0"\n')
    assert packager.release_version(tmp_path) == "0.2.0"
    (tmp_path / "casd_core" / "__init__.py").write_text('__version__ = "0.1.9"\n')
    with pytest.raises(packager.PackagingError, match=r"casd_core/__init__.py: 0\.1\.9"):
        packager.release_version(tmp_path)


# Runs in a fresh interpreter: argv = zip, raster, output GeoPackage. Prints MARKER + JSON on success.
INSTALL_AND_RUN = r'''
import gc, importlib, importlib.util, json, os, sys
from pathlib import Path

zip_path, raster, output = sys.argv[1:4]
PLUGIN = "casd_scene_classifier"

# 1. No casd_core but the ZIP's: drop the editable install's finder/hooks and any sys.path
#    entry holding a casd_core folder (the repository), before anything imports it.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not (Path(p or ".") / "casd_core").is_dir()]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
assert "casd_core" not in sys.modules and importlib.util.find_spec("casd_core") is None, "casd_core still importable"

from qgis.core import QgsApplication, QgsProject, QgsSettings, QgsVectorLayer

app = QgsApplication([], True)
app.initQgis()
profile = Path(QgsApplication.qgisSettingsDirPath())
assert profile.resolve().is_relative_to(Path(os.environ["QGIS_CUSTOM_CONFIG_PATH"]).resolve()), profile
plugins_dir = profile / "python" / "plugins"  # QGIS's home plugin path
assert not plugins_dir.exists(), "the profile is not fresh"
python_dir = os.path.join(QgsApplication.pkgDataPath(), "python")
sys.path.append(os.path.join(python_dir, "plugins"))  # Processing


class Iface:  # the QgisInterface calls the plugin makes, on real widgets
    def __init__(self):
        from qgis.gui import QgsMapCanvas, QgsMessageBar
        from qgis.PyQt.QtWidgets import QMainWindow
        self.window = QMainWindow()
        self.raster_menu = self.window.menuBar().addMenu("&Raster")
        self.bar = QgsMessageBar(self.window)
        self.canvas = QgsMapCanvas(self.window)
    def mainWindow(self): return self.window
    def mapCanvas(self): return self.canvas
    def messageBar(self): return self.bar
    def addToolBar(self, name): return self.window.addToolBar(name)
    def addPluginToRasterMenu(self, name, action): self.raster_menu.addMenu(name).addAction(action)
    def removePluginRasterMenu(self, name, action):
        for entry in self.raster_menu.actions():
            if entry.menu() is not None and entry.text() == name:
                entry.menu().removeAction(action)


import qgis.utils
qgis.utils.iface = Iface()
from processing.core.Processing import Processing
Processing.initialize()

# 2. Install from ZIP as pyplugin_installer does: the folder of the first */metadata.txt, QGIS's unzip.
import zipfile
with zipfile.ZipFile(zip_path) as archive:
    name = os.path.split(sorted(n for n in archive.namelist() if n.endswith("metadata.txt"))[0])[0]
assert name == PLUGIN, name
spec = importlib.util.spec_from_file_location("qgis_unzip", os.path.join(python_dir, "pyplugin_installer", "unzip.py"))
qgis_unzip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qgis_unzip)
qgis_unzip.unzip(zip_path, str(plugins_dir))
folder = (plugins_dir / PLUGIN).resolve()

qgis.utils.plugin_paths.append(str(plugins_dir))
sys.path.insert(0, str(plugins_dir))
qgis.utils.updateAvailablePlugins()
assert PLUGIN in qgis.utils.available_plugins, qgis.utils.available_plugins
assert qgis.utils.loadPlugin(PLUGIN), "loadPlugin failed"
assert qgis.utils.startPlugin(PLUGIN), "startPlugin failed"
QgsSettings().setValue("/PythonPlugins/" + PLUGIN, True)  # enabled, as the installer records it
registry = QgsApplication.processingRegistry()
assert registry.providerById("casd") is not None, "no casd provider"

import casd_core
from casd_core.package import ModelPackage, default_model_path
core_file = Path(casd_core.__file__).resolve()
assert core_file.is_relative_to(folder), f"casd_core comes from {core_file}, not from the ZIP"
assert default_model_path().resolve().is_relative_to(folder), default_model_path()
class_names = ModelPackage.load(default_model_path()).class_names

# 3. The bundled model labels a real raster through Processing.
import processing
result = processing.run("casd:classifyraster", {"INPUT": raster, "TILE_SIZE": 50, "TILE_UNIT": 0,
                                                "DEVICE": 1, "OUTPUT": output})
layer = QgsVectorLayer(result["OUTPUT"], "labels", "ogr")
assert layer.isValid(), result
count = layer.featureCount()
found = sorted({f["class_name"] for f in layer.getFeatures()})
del layer
assert count == result["TILE_COUNT"] > 0, (count, result)
assert found and set(found) <= set(class_names), (found, class_names)

# 4. Unloading leaves no provider and no module of the plugin behind.
assert qgis.utils.unloadPlugin(PLUGIN), "unloadPlugin failed"
from qgis.PyQt.QtCore import QCoreApplication, QEvent
QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
assert registry.providerById("casd") is None, "the provider is still registered"
left = sorted(m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + "."))
assert not left, left

report = {"casd_core": str(core_file), "plugin_dir": str(folder), "features": count, "classes": found,
          "model_classes": len(class_names)}
QgsProject.instance().removeAllMapLayers()
gc.collect()  # layers referenced from Python make exitQgis() segfault
app.exitQgis()
print(MARKER, json.dumps(report), flush=True)
'''.replace("MARKER", repr(MARKER))


def _fresh_environment(home: Path) -> dict[str, str]:
    """A QGIS that has never run: every settings folder in ``home``, headless, no plugin paths."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "QGIS_PLUGINPATH", "CASD_DEFAULT_MODEL",
                        "QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH")}
    # caches (torch, matplotlib) stay where they are: only settings and data go to the new home
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    for variable, folder in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                             ("XDG_RUNTIME_DIR", "runtime"), ("QGIS_CUSTOM_CONFIG_PATH", "qgis")):
        path = home / folder
        path.mkdir(mode=0o700, parents=True)
        env[variable] = str(path)
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


def test_zip_installs_into_a_fresh_qgis_runs_the_bundled_model_and_unloads(plugin_zip, rasters, tmp_path):
    script = tmp_path / "install_and_run.py"
    script.write_text(INSTALL_AND_RUN)
    work = tmp_path / "work"
    work.mkdir()
    output = tmp_path / "labels.gpkg"
    run = subprocess.run([sys.executable, str(script), str(plugin_zip), str(rasters / "test_tiled.tif"), str(output)],
                         cwd=work, env=_fresh_environment(tmp_path / "fresh"), capture_output=True, text=True,
                         timeout=300)
    log = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"exit {run.returncode}\n{log}"
    lines = [line for line in run.stdout.splitlines() if line.startswith(MARKER + " ")]
    assert lines, log
    report = json.loads(lines[-1][len(MARKER) + 1:])
    plugin_dir = tmp_path / "fresh" / "qgis" / "profiles" / "default" / "python" / "plugins" / PLUGIN
    assert Path(report["plugin_dir"]) == plugin_dir.resolve()
    assert Path(report["casd_core"]).is_relative_to(plugin_dir.resolve())
    assert report["features"] == 25  # 250 m / 50 m → 5 × 5 tiles
    assert report["model_classes"] == 30 and report["classes"]
    assert output.is_file()
