"""What an ONNX file may contain before onnxruntime sees it.

ONNX is protobuf, parsed, never executed, but two parts of it reach outside the graph:
operators of a custom domain (implemented by a native library a runtime would have to load)
and tensors stored as *external data* (a file path inside the model). So a model is refused
when any operator, opset import or model-local function is outside the standard domains
``ai.onnx`` (also spelled "") and ``ai.onnx.ml``: our exports, fp32 and int8 (QDQ), need
nothing else, and ``com.microsoft`` (onnxruntime's contrib ops) is not needed because the
int8 export uses the standard QuantizeLinear/DequantizeLinear pairs. An external-data location
must be a relative path that stays inside the model's folder (no absolute path, no ``..``
escape, no symlink out of it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from casd_core.errors import CasdError, param

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def load_checked(path: str | os.PathLike) -> Any:
    """Parse ``path`` (weights in external files are not read) and :func:`check_model` it."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise CasdError(f"{param('model')} {path} does not exist; pass an .onnx file written by `casd export`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise CasdError(f"{path.name} is not a readable ONNX model ({exc}); export it again with "
                        "`casd export`") from None
    check_model(model, path.parent, path.name)
    return model


def check_model(model: Any, folder: Path, name: str) -> None:
    """Refuse custom-op domains and external data outside ``folder`` (see the module doc)."""
    domains = {opset.domain for opset in model.opset_import}
    domains |= {node.domain for node in _nodes(model.graph)}
    for function in model.functions:
        domains.add(function.domain)
        domains |= {node.domain for node in function.node}
    custom = sorted(domains - ALLOWED_DOMAINS)
    if custom:
        raise CasdError(f"{name} uses operators of the custom domain(s) {', '.join(map(repr, custom))}, "
                        "which would need native code outside onnxruntime's standard operators; "
                        "only models written by `casd export` are accepted")
    for tensor in _tensors(model.graph):
        if tensor.data_location == tensor.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            _check_location(location, folder, name)


def drop_unused_opsets(model: Any) -> None:
    """Keep only the opset imports that nodes use: tools (the quantizer, onnxruntime's optimiser)
    declare contrib domains they did not use, which :func:`check_model` would refuse."""
    used = {node.domain for node in _nodes(model.graph)} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _check_location(location: str, folder: Path, name: str) -> None:
    refused = (f"{name} stores weights at {location!r}, outside the model's folder; keep the "
               "external-data file beside the .onnx file under a relative name")
    if not location or os.path.isabs(location) or Path(location).drive or "\\" in location:
        raise CasdError(refused)
    root = folder.resolve()
    target = (root / location).resolve()
    if not target.is_relative_to(root):
        raise CasdError(refused)


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes(sub)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every stored tensor: initializers, sparse ones and Constant-node values, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)
