"""Build the release ZIP of the QGIS plugin and check it as plugins.qgis.org would.

    python scripts/package_plugin.py [--out DIR] [--check-urls]

writes ``DIR/casd_scene_classifier-<version>.zip`` (default ``dist/`` at the repository root)
with one top folder, ``casd_scene_classifier/``, holding exactly what the plugin needs at run
time: ``metadata.txt``, ``__init__.py``, ``LICENSE``, ``plugin/``, ``casd_core/`` and
``resources/`` (icons and the bundled ``models/*.safetensors``). Files come from git
(``git ls-files``), so untracked junk never ships; new, not yet committed files under
``casd_core/`` and ``plugin/`` (not ignored by ``.gitignore``) are included too.

The version is read from ``metadata.txt`` and must equal ``casd_core.__version__`` and
``pyproject.toml``'s. The ZIP is written to a temporary file beside the target, checked, and
only then renamed into place: a failed build leaves the previous ZIP (if any) untouched.

:func:`repository_errors` reimplements the checks of the official plugin repository's
validator (qgis/QGIS-Django, ``qgis-app/plugins/validator.py``, function ``validator``), plus
the one rule of QGIS's own *Install from ZIP* (``pyplugin_installer/installer.py``) that a
package can break; :func:`layout_errors` checks this project's own packaging rules. Both
return a list of messages (empty: the ZIP passes) so that tests can call them.

Standard library only, any Python >= 3.8.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "casd_scene_classifier"  # the folder QGIS installs the plugin into

# What ships: top-level files, and folders whose tracked files ship (untracked ones too where
# marked True: code that may not be committed yet).
TOP_FILES = ("metadata.txt", "__init__.py", "LICENSE")
TOP_FOLDERS = {"plugin": True, "casd_core": True, "resources": False}
# resources/ holds exactly these (anything else there fails the layout check, never ships silently)
RESOURCE_PATTERNS = (re.compile(r"^resources/icon\.(png|svg)$"),
                     re.compile(r"^resources/models/[^/]+\.(safetensors|onnx)$"))
# Never shipped, wherever they are.
EXCLUDED_PARTS = {"__pycache__", "__MACOSX", ".git"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp", ".orig", ".rej", ".swp", "~", ".egg-info")

# --- qgis/QGIS-Django qgis-app/plugins/validator.py ------------------------------------------
PLUGIN_MAX_UPLOAD_SIZE = 25_000_000  # bytes ("25 mb")
PLUGIN_REQUIRED_METADATA = ("name", "description", "version", "qgisMinimumVersion", "author",
                            "email", "about", "tracker", "repository")
PLUGIN_BOOLEAN_METADATA = ("experimental", "deprecated", "server")
FORBIDDEN_DIRS = ("__MACOSX", ".git", "__pycache__")
PLACEHOLDER_URLS = {"tracker": "http://bugs", "repository": "http://repo", "homepage": "http://homepage"}
PACKAGE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-_]+$")
NEW_PACKAGE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")  # PEP 8, required of new plugins
# Versions are stored in 32-character fields (models.py: VersionField, QGVersionZeroForcedField).
VERSION_MAX_LENGTH = 32
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}([-.]?[A-Za-z]+\d*)?$")  # 1.2.3, 1.2.3-beta1, 0.9rc2
QGIS_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?$")
# plugins.qgis.org/docs/publish: "Don't include binaries".
BINARY_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".exe")


class PackagingError(Exception):
    """A build or check failed; the message says what and how to fix it."""


# --- versions ----------------------------------------------------------------------------------

def read_metadata(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion), as the validator reads them
    parser.read_string(text)
    return parser


def versions(repo: Path) -> dict[str, str]:
    """The version as each of the three files that state it says it."""
    found = {}
    metadata = read_metadata((repo / "metadata.txt").read_text(encoding="utf-8"))
    found["metadata.txt"] = metadata.get("general", "version", fallback="").strip()
    init = (repo / "casd_core" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init, re.MULTILINE)
    found["casd_core/__init__.py"] = match.group(1) if match else ""
    pyproject = (repo / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the [project] table's version line
        project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", pyproject, re.MULTILINE | re.DOTALL)
        match = project and re.search(r"""^version\s*=\s*["']([^"']+)["']""", project.group(1), re.MULTILINE)
        found["pyproject.toml"] = match.group(1) if match else ""
    else:
        found["pyproject.toml"] = str(tomllib.loads(pyproject).get("project", {}).get("version", ""))
    return found


def release_version(repo: Path) -> str:
    """metadata.txt's version, which must be the one casd_core and pyproject.toml state."""
    found = versions(repo)
    version = found["metadata.txt"]
    if not version:
        raise PackagingError("metadata.txt has no version= in its [general] section")
    if len(set(found.values())) != 1:
        stated = ", ".join(f"{name}: {value or '(none)'}" for name, value in found.items())
        raise PackagingError(f"the version differs between files ({stated}); "
                             "set the same version in all three before packaging")
    return version


# --- what ships --------------------------------------------------------------------------------

def _git_files(repo: Path, *args: str) -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args],
                             check=True, capture_output=True).stdout
    except FileNotFoundError as error:
        raise PackagingError("git is not installed; the package is made from git's file list") from error
    except subprocess.CalledProcessError as error:
        raise PackagingError(f"{repo} is not a git checkout ({error.stderr.decode().strip()}); "
                             "package from a clone of the repository") from error
    return [name for name in out.decode("utf-8").split("\0") if name]


def _excluded(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return (any(part in EXCLUDED_PARTS or part.startswith(".") for part in parts)
            or path.endswith(EXCLUDED_SUFFIXES))


def plugin_files(repo: Path) -> list[str]:
    """Repository-relative paths (sorted) of the files that go into the ZIP.

    Tracked files (as they are in the working tree) of the shipped paths, plus untracked,
    not ignored files under the code folders; files deleted in the working tree are left out.
    """
    tracked = set(_git_files(repo, "--cached"))
    untracked = set(_git_files(repo, "--others", "--exclude-standard"))
    chosen = set()
    for path in tracked | untracked:
        top = path.split("/", 1)[0]
        if path in TOP_FILES:
            ok = True
        elif top in TOP_FOLDERS and "/" in path:
            ok = path in tracked or TOP_FOLDERS[top]
        else:
            ok = False
        if ok and not _excluded(path) and (repo / path).is_file():
            chosen.add(path)
    missing = [name for name in TOP_FILES if name not in chosen]
    if missing:
        raise PackagingError(f"{', '.join(missing)} missing from the repository (or not in git); "
                             "the plugin cannot ship without it")
    return sorted(chosen)


def _dirty(repo: Path, files: list[str]) -> list[str]:
    """Shipped files that differ from the last commit (reported, not refused)."""
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-z", "--", *files],
                         capture_output=True).stdout.decode("utf-8", "replace")
    return [entry[3:] for entry in out.split("\0") if len(entry) > 3]


# --- building ----------------------------------------------------------------------------------

def _zip_info(name: str, stamp: float, mode: int, is_dir: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.localtime(max(stamp, 315532800))[:6])  # zip: >= 1980
    info.create_system = 3  # Unix, so that the permission bits below mean something
    if is_dir:
        info.external_attr = (0o40755 << 16) | 0x10
    else:
        info.external_attr = ((0o100755 if mode & 0o111 else 0o100644) << 16)
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_zip(repo: Path, files: list[str], target: Path) -> None:
    """Writes ``files`` under ``PACKAGE_NAME/`` into ``target`` (folders first, sorted)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds: one timestamp for all
    folders = sorted({str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."})
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        now = float(epoch) if epoch else time.time()
        archive.writestr(_zip_info(f"{PACKAGE_NAME}/", now, 0, is_dir=True), b"")
        for folder in folders:
            archive.writestr(_zip_info(f"{PACKAGE_NAME}/{folder}/", now, 0, is_dir=True), b"")
        for name in files:
            source = repo / name
            status = source.stat()
            info = _zip_info(f"{PACKAGE_NAME}/{name}", float(epoch) if epoch else status.st_mtime, status.st_mode)
            info.file_size = status.st_size
            with open(source, "rb") as src, archive.open(info, "w") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def build(repo: Path = REPO, out_dir: Path | None = None, check_urls: bool = False) -> Path:
    """Builds, checks and atomically writes the ZIP; returns its path. Raises PackagingError."""
    repo = Path(repo).resolve()
    version = release_version(repo)
    files = plugin_files(repo)
    out_dir = Path(out_dir) if out_dir is not None else repo / "dist"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PACKAGE_NAME}-{version}.zip"
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=out_dir)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write_zip(repo, files, temp)
        errors = [f"plugins.qgis.org: {e}" for e in repository_errors(temp, check_urls=check_urls)]
        errors += [f"layout: {e}" for e in layout_errors(temp)]
        if errors:
            raise PackagingError("the ZIP fails these checks (nothing written):\n  - " + "\n  - ".join(errors))
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


# --- checks: the official plugin repository ----------------------------------------------------

def _url_unreachable(url: str) -> bool:
    """The validator's online check (a HEAD request, status >= 400 or no answer fails)."""
    import urllib.request

    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "Mozilla/5.0"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status >= 400
    except Exception:
        return True


def repository_errors(zip_path: Path, is_new: bool = True, check_urls: bool = False) -> list[str]:
    """What plugins.qgis.org's upload validator would reject in ``zip_path`` (empty: accepted).

    The checks of ``validator()`` in qgis/QGIS-Django ``qgis-app/plugins/validator.py``, in its
    order; where the site only warns or silently accepts (several top folders, a missing icon,
    a boolean it would read as False) this is stricter. ``is_new``: the PEP 8 folder-name rule
    the site applies to new plugins. ``check_urls``: also the site's online check that
    tracker/repository/homepage answer (needs the network; off by default).
    """
    errors: list[str] = []
    zip_path = Path(zip_path)
    size = zip_path.stat().st_size
    if size > PLUGIN_MAX_UPLOAD_SIZE:
        errors.append(f"file is too big: {size / 1e6:.1f} MB, the limit is {PLUGIN_MAX_UPLOAD_SIZE / 1e6:.0f} MB")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        return errors + [f"could not unzip the file ({error})"]
    with archive:
        namelist = archive.namelist()
        for name in namelist:
            if ".." in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                errors.append(f"zip cannot contain path information (found '{name}')")
            if ".pyc" in name:
                errors.append(f"zip cannot contain .pyc files (found '{name}')")
            for forbidden in FORBIDDEN_DIRS:
                if forbidden in name.split("/"):
                    errors.append(f"zip cannot contain a '{forbidden}' directory (found '{name}')")
            if name.lower().endswith(BINARY_SUFFIXES):
                errors.append(f"plugins must not include binaries (found '{name}')")
        bad = archive.testzip()
        if bad:
            errors.append(f"bad zip (CRC error) on file {bad}")
        if not namelist or "/" not in namelist[0]:
            return errors + ["cannot find a folder inside the compressed package: this is not a valid plugin"]
        parents = sorted({name.split("/")[0] for name in namelist})
        if len(parents) > 1:
            errors.append(f"zip has several top-level entries ({', '.join(parents)}); it must hold one plugin folder")
        package = namelist[0].split("/")[0]
        if not PACKAGE_NAME_RE.match(package):
            errors.append(f"top-level folder '{package}' must start with an ASCII letter and contain only "
                          "ASCII letters, digits, '-' and '_'")
        if is_new and not NEW_PACKAGE_NAME_RE.match(package):
            errors.append(f"top-level folder '{package}' must be PEP 8 compliant (lowercase, words separated by '_')")
        init_name, metadata_name = f"{package}/__init__.py", f"{package}/metadata.txt"
        if init_name not in namelist:
            errors.append(f"cannot find {init_name} in the plugin package")
        if metadata_name not in namelist:
            return errors + [f"cannot find {metadata_name} (QGIS 3 reads the metadata only from metadata.txt)"]
        # pyplugin_installer's Install from ZIP takes the plugin folder from the first */metadata.txt
        # in sorted order: a second metadata.txt deeper down would make QGIS install the wrong folder.
        others = [n for n in namelist if n.endswith("metadata.txt") and n != metadata_name]
        if others:
            errors.append(f"only one metadata.txt may exist; QGIS's Install from ZIP would be confused by {others}")
        try:
            parser = read_metadata(archive.read(metadata_name).decode("utf-8"))
        except (UnicodeDecodeError, configparser.Error) as error:
            return errors + [f"errors parsing {metadata_name}: {error}"]
        if not parser.has_section("general"):
            return errors + [f"cannot find a section named 'general' in {metadata_name}"]
        metadata = dict(parser.items("general"))
        missing = [key for key in PLUGIN_REQUIRED_METADATA if not metadata.get(key, "").strip()]
        if missing:
            errors.append(f"metadata.txt lacks (or leaves empty) the required {', '.join(missing)}")
        icon = metadata.get("icon", "").strip()
        icon = icon[2:] if icon.startswith("./") else icon
        if not icon:
            errors.append("metadata.txt has no icon= (the site then shows no icon)")
        elif f"{package}/{icon}" not in namelist:
            errors.append(f"the icon {icon} named in metadata.txt is not in the package")
        for flag in PLUGIN_BOOLEAN_METADATA:
            value = metadata.get(flag)
            if value is not None and value.strip().lower() not in ("true", "false", "1", "0"):
                errors.append(f"{flag}={value!r} is not True/False (the site would read it as False)")
        for key in ("qgisMinimumVersion", "qgisMaximumVersion"):
            value = metadata.get(key, "").strip()
            if value and (len(value) > VERSION_MAX_LENGTH or not QGIS_VERSION_RE.match(value)):
                errors.append(f"{key}={value!r} is not a QGIS version (x.y or x.y.z)")
        minimum = metadata.get("qgisMinimumVersion", "").strip()
        maximum = metadata.get("qgisMaximumVersion", "").strip()
        if QGIS_VERSION_RE.match(minimum) and QGIS_VERSION_RE.match(maximum):
            if tuple(map(int, minimum.split("."))) > tuple(map(int, maximum.split("."))):
                errors.append(f"qgisMinimumVersion {minimum} is above qgisMaximumVersion {maximum}")
        if QGIS_VERSION_RE.match(minimum) and tuple(map(int, minimum.split("."))) < (1, 8):
            errors.append(f"qgisMinimumVersion {minimum} is below 1.8 (the site then wants the metadata "
                          "in __init__.py too)")
        version = metadata.get("version", "").strip()
        if version and (len(version) > VERSION_MAX_LENGTH or not VERSION_RE.match(version)):
            errors.append(f"version={version!r} is not a plugin version (e.g. 1.2.3 or 1.2.3-beta1, "
                          f"at most {VERSION_MAX_LENGTH} characters)")
        for key, placeholder in PLACEHOLDER_URLS.items():
            url = metadata.get(key, "").strip()
            if key == "homepage" and not url:
                continue  # optional
            parsed = urlparse(url)
            if url == placeholder or not (parsed.scheme and parsed.netloc):
                errors.append(f"{key}={url!r} is not a valid URL")
            elif check_urls and _url_unreachable(url):
                errors.append(f"{key}={url} cannot be reached")
        if f"{package}/LICENSE" not in namelist:
            errors.append(f"cannot find {package}/LICENSE (mandatory on plugins.qgis.org since June 2024)")
        if "/" in metadata.get("author", ""):
            errors.append("author name cannot contain slashes")
    return errors


# --- checks: this project's packaging rules ----------------------------------------------------

def layout_errors(zip_path: Path) -> list[str]:
    """This project's rules: one ``casd_scene_classifier/`` holding exactly the run-time files."""
    errors = []
    with zipfile.ZipFile(zip_path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
    prefix = f"{PACKAGE_NAME}/"
    outside = [n for n in names if not n.startswith(prefix)]
    if outside:
        errors.append(f"entries outside {prefix}: {outside[:5]}")
    inner = [n[len(prefix):] for n in names if n.startswith(prefix)]
    tops = {n.split("/", 1)[0] + ("/" if "/" in n else "") for n in inner}
    expected = set(TOP_FILES) | {f"{folder}/" for folder in TOP_FOLDERS}
    if tops != expected:
        extra, lacking = sorted(tops - expected), sorted(expected - tops)
        errors.append(f"top level must be exactly {sorted(expected)}"
                      + (f"; unexpected: {extra}" if extra else "") + (f"; missing: {lacking}" if lacking else ""))
    for name in inner:
        if _excluded(name):
            errors.append(f"{name} must not ship (cache, compiled file, dotfile or editor leftover)")
        if name.startswith("resources/") and not any(p.match(name) for p in RESOURCE_PATTERNS):
            errors.append(f"{name}: resources/ ships only icon.png, icon.svg and models/*.safetensors|*.onnx "
                          "(add a pattern to RESOURCE_PATTERNS in scripts/package_plugin.py if it must ship)")
    for required in ("plugin/__init__.py", "casd_core/__init__.py", "resources/icon.png", "resources/icon.svg"):
        if required not in inner:
            errors.append(f"{required} is missing")
    if not any(p.startswith("resources/models/") for p in inner):
        errors.append("no bundled model under resources/models/")
    return errors


# --- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder to write the ZIP into (default: dist/ at the repository root)")
    parser.add_argument("--check-urls", action="store_true",
                        help="also check online that tracker, repository and homepage answer, as the site does")
    args = parser.parse_args(argv)
    try:
        zip_path = build(REPO, args.out, check_urls=args.check_urls)
    except PackagingError as error:
        print(f"package_plugin: {error}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(zip_path) as archive:
        count = sum(1 for n in archive.namelist() if not n.endswith("/"))
    print(f"package_plugin: {zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB, {count} files); "
          "plugins.qgis.org checks passed" + ("" if args.check_urls else " (URLs checked offline only)"))
    dirty = _dirty(REPO, plugin_files(REPO))
    if dirty:
        print(f"package_plugin: note: built from the working tree; {len(dirty)} shipped file(s) differ from "
              f"the last commit: {', '.join(dirty[:6])}{' …' if len(dirty) > 6 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
