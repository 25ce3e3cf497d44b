"""The model package's description inside an ONNX file (``metadata_props``), and back.

Key ``"casd"`` holds the same JSON document as a ``.safetensors`` package (every field: classes,
colours, bands, input size, normalisation, value scale, footprint, temperature, pixel stats,
training config, metrics), so an export loses nothing but the torch weights. Deepness's keys
(QGIS plugin, https://qgis-plugin-deepness.readthedocs.io) are written too where they overlap,
each a JSON value as Deepness parses them: ``class_names`` ({"0": name, ...}), ``resolution``
(cm per input pixel), ``tiles_size`` (documented) and ``tile_size`` (what its code reads),
``standardization_mean``/``standardization_std`` (applied by Deepness after dividing by 255, so
scaled here for packages whose value scale is not 255) and ``model_type`` ("Classifier":
Deepness has no scene-classification type yet, so it will ask for one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from casd_core.errors import CasdError
from casd_core.package import METADATA_KEY, ModelPackage

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"  # softmax(logits / temperature), calibrated


def package_props(package: ModelPackage, graph: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` for an export of ``package``; ``graph`` says what the graph holds
    (``precision``: fp32/int8, ``normalisation``: where it happens), stored under ``casd_graph``."""
    props = {METADATA_KEY: json.dumps(package.metadata()), "casd_graph": json.dumps(graph)}
    deepness_scale = package.value_scale / 255.0  # Deepness divides raw values by 255 first
    props["model_type"] = json.dumps("Classifier")
    props["class_names"] = json.dumps({str(i): name for i, name in enumerate(package.class_names)})
    props["tiles_size"] = props["tile_size"] = json.dumps(package.input_size)
    props["standardization_mean"] = json.dumps([m * deepness_scale for m in package.mean])
    props["standardization_std"] = json.dumps([s * deepness_scale for s in package.std])
    metres_per_pixel = (package.tile_footprint_m / package.input_size if package.tile_footprint_m
                        else package.gsd_m)
    if metres_per_pixel:
        props["resolution"] = json.dumps(round(metres_per_pixel * 100.0, 4))
    return props


def props_of(model: Any) -> dict[str, str]:
    """An ONNX ``ModelProto``'s ``metadata_props`` as a dict."""
    return {entry.key: entry.value for entry in model.metadata_props}


def package_from_props(props: dict[str, str], source: str) -> ModelPackage:
    """The package (without weights) an export describes; refused when it is not ours."""
    not_a_package = (f"{source} is not a CASD ONNX model (expected a file written by `casd export`, "
                     "with the package description in its metadata)")
    try:
        meta = json.loads(props[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CasdError(not_a_package) from None
    return ModelPackage.from_metadata(meta, {}, not_a_package)


def graph_info(props: dict[str, str]) -> dict[str, Any]:
    """What the graph holds (``casd_graph``): precision and normalisation."""
    try:
        info = json.loads(props.get("casd_graph", "{}"))
    except json.JSONDecodeError:
        info = {}
    return info if isinstance(info, dict) else {}


def read_package(path: str | Path) -> ModelPackage:
    """The description of an ONNX export, after the file passed :func:`~casd_core.onnx.safety.check_model`."""
    from casd_core.onnx.safety import load_checked

    path = Path(path)
    model = load_checked(path)
    return package_from_props(props_of(model), path.name)
