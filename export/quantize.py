"""int8 for ONNX Runtime: ORT's dynamic quantiser applied to an exported fp32 part.

Only MatMul/Gemm nodes inside a part's `int8_scopes` are quantised (the exporter records each
node's module path in its metadata): int8 weights, uint8 activations with per-batch scales, so no
calibration set. Chosen by measurement on this CPU (docs/export.md): CLIP's transformer runs 1.7x
faster this way; static QDQ quantisation was no faster there and worse, and on the VQ encoder's
convolutions it changed 40 % of the code indices.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from d3qe_serve.d3qe.parts import PartSpec

SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # written by torch.onnx.export(dynamo=True) on every node
INT8_OP_TYPES = ("MatMul", "Gemm")


def nodes_in_scopes(model: onnx.ModelProto, scopes: Iterable[str]) -> list[str]:
    """Names of the nodes whose module path passes through one of `scopes` (e.g. "clip_model.visual")."""
    scopes = tuple(scopes)
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        path = ast.literal_eval(meta.get(SCOPES_KEY, "[]"))
        if any(m == s or m.startswith(s + ".") for m in path for s in scopes):
            names.append(node.name)
    return names


def quantize_int8(spec: PartSpec, fp32_path: Path, int8_path: Path) -> None:
    """Write the int8 variant of the fp32 ONNX part at `fp32_path`."""
    model = onnx.load(fp32_path)
    nodes = nodes_in_scopes(model, spec.int8_scopes)
    if not nodes:
        raise ValueError(f"{spec.name}: no node of {fp32_path} carries a module path in {spec.int8_scopes}")
    # The exporter writes value_info for initializers; the quantiser transposes Gemm weights and its
    # strict shape re-inference then trips over the stale entries.
    initializers = {t.name for t in model.graph.initializer}
    value_info = [v for v in model.graph.value_info if v.name not in initializers]
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(value_info)
    quantize_dynamic(
        model,
        int8_path,
        op_types_to_quantize=list(INT8_OP_TYPES),
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
