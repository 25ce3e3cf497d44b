"""pyproject.toml's [project].dependencies is the one list; every copy must agree with it.

Copies: ``requirements.txt`` (an exact pin per dependency for the dev venv),
``plugin/deps.py`` ``DEPENDENCIES`` (what the plugin checks and installs inside QGIS; the plugin
ZIP does not ship pyproject.toml) and the dependency sentences of ``metadata.txt``'s ``about=``.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_deps() -> ModuleType:
    """plugin/deps.py by path: standard library only, no QGIS, no package name to guess."""
    spec = importlib.util.spec_from_file_location("casd_plugin_deps", REPO / "plugin" / "deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEPS = _load_deps()
PYPROJECT = tuple(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])

try:  # the real PEP 440 / 508 implementation when the venv has it, else the plugin's own parser
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def _name_and_allows(requirement: str):
        parsed = Requirement(requirement)
        return canonicalize_name(parsed.name), lambda version: parsed.specifier.contains(version, prereleases=True)
except ImportError:  # pragma: no cover - packaging ships with pip/setuptools almost everywhere
    def _name_and_allows(requirement: str):
        name = DEPS._parse(requirement)[0]
        return re.sub(r"[-_.]+", "-", name).lower(), lambda version: DEPS._allows(version, requirement)


def _pins() -> dict[str, str]:
    """requirements.txt as canonical name -> pinned version (every line must be an exact pin)."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"requirements.txt: {line!r} is not an exact pin (name==version)"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in pins, f"requirements.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def _about() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string((REPO / "metadata.txt").read_text())
    return parser["general"]["about"]


def test_every_dependency_is_pinned_to_a_version_it_allows() -> None:
    pins = _pins()
    for requirement in PYPROJECT:
        name, allows = _name_and_allows(requirement)
        assert name in pins, f"requirements.txt has no pin for {requirement!r}"
        assert allows(pins[name]), f"requirements.txt pins {name}=={pins[name]}, outside {requirement!r}"


def test_plugin_checks_exactly_the_pyproject_dependencies() -> None:
    assert DEPS.DEPENDENCIES == PYPROJECT
    assert [req for _dist, _minimum, req in DEPS.REQUIREMENTS.values()] == list(PYPROJECT)
    for module, (dist, minimum, requirement) in DEPS.REQUIREMENTS.items():
        assert importlib.util.find_spec(module) is not None, f"{dist} is not imported as {module}"
        assert _name_and_allows(requirement)[1](minimum) and not _name_and_allows(requirement)[1]("0.0.1")


@pytest.mark.parametrize("version, expected", [("1.23", True), ("1.26.4", True), ("1.22.9", False),
                                               ("2.0.0", False), ("2.0.0rc1", False), ("2.1", False)])
def test_plugin_version_check_honours_upper_bounds(version: str, expected: bool) -> None:
    requirement = "numpy>=1.23,<2"
    assert DEPS._allows(version, requirement) is expected
    assert _name_and_allows(requirement)[1](version) is expected


def test_pinned_versions_satisfy_the_plugins_own_check() -> None:
    pins = _pins()
    for requirement in PYPROJECT:
        assert DEPS._allows(pins[_name_and_allows(requirement)[0]], requirement), requirement


def test_metadata_lists_the_dependencies_and_their_install_command() -> None:
    about = _about()
    sentence = about[about.index("Python dependencies"):about.index("The plugin loads")]
    commands = [line for line in about.splitlines() if line.strip().startswith("python3 -m pip install")]
    assert len(commands) == 1, "about= should show one `python3 -m pip install` command"
    assert tuple(re.findall(r'"([^"]+)"', commands[0])) == PYPROJECT
    for requirement in PYPROJECT:
        name = DEPS._parse(requirement)[0]
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", sentence), f"about= does not name {name}"
