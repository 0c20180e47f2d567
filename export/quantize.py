"""int8 for the exported ONNX parts: ONNX Runtime's dynamic quantiser, and static quantisation calibrated on
corpus images (ONNX Runtime's QDQ `quantize_static`; NNCF for OpenVINO, written as OpenVINO IR).

Only nodes inside a part's `int8_scopes` are quantised where it declares some (the exporter records each
node's module path in its metadata); a part without scopes is quantised whole (a tuner measures such
candidates, e.g. the VQ encoder's, to reject them). Each quantiser returns a line saying what it took, for
the manifest (`PartEntry.quantized`).

Measured on this CPU (docs/export.md, issue 22): dynamic int8 (int8 weights, uint8 activations with
per-batch scales) runs CLIP's transformer 1.7x faster; static int8 on the VQ encoder's convolutions
changes about half of the code indices, whichever quantiser.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from d3qe_serve.contract import CLIP_VISUAL, D3QE_HEAD
from d3qe_serve.d3qe.parts import PartSpec

SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # written by torch.onnx.export(dynamo=True) on every node
INT8_OP_TYPES = ("MatMul", "Gemm")
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")  # static QDQ: the convolutions too (CLIP's patch embedding, the VQ's)
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")  # ORT 1.32: its Distribution method fails on these graphs
# NNCF's transformer mode (SmoothQuant, attention-aware quantiser placement) for the parts that are transformers.
NNCF_TRANSFORMERS = (CLIP_VISUAL, D3QE_HEAD)
Feeds = Sequence[dict[str, np.ndarray]]


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


def _scoped_nodes(spec: PartSpec, model: onnx.ModelProto, path: Path) -> list[str] | None:
    """The nodes to quantise: those in the part's `int8_scopes`, or None (all) for a part without scopes."""
    if not spec.int8_scopes:
        return None
    nodes = nodes_in_scopes(model, spec.int8_scopes)
    if not nodes:
        raise ValueError(f"{spec.name}: no node of {path} carries a module path in {spec.int8_scopes}")
    return nodes


def _where(spec: PartSpec) -> str:
    scope = f"in {', '.join(spec.int8_scopes)}" if spec.int8_scopes else "in the whole part"
    return f"{scope} but its first and last (kept fp32)"


def _first_and_last(names: Sequence[str]) -> set[str]:
    """The first and the last of a part's quantisable operations, in graph order: they stay fp32 (CLIP's patch
    embedding and output projection, the VQ encoder's first convolution and nearest-code search, the head's
    classifier), as usual in post-training quantisation. Measured on the full-size CLIP tower (seeded weights,
    NNCF, 32 calibration images, 16 others judged): cosine min 0.9988 → 0.9990, max |Δ| 0.19 → 0.17."""
    return {names[0], names[-1]} if names else set()


def static_nodes(spec: PartSpec, model: onnx.ModelProto, path: Path) -> list[str]:
    """The ONNX nodes static int8 quantises: `STATIC_OP_TYPES` in the part's scopes (all of the part without
    scopes), but the first and the last of them."""
    scoped = _scoped_nodes(spec, model, path)
    inside = set(scoped) if scoped is not None else None
    nodes = [n.name for n in model.graph.node if n.op_type in STATIC_OP_TYPES and (inside is None or n.name in inside)]
    kept = _first_and_last(nodes)
    return [n for n in nodes if n not in kept]


def _without_stale_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter writes value_info for initializers; the quantisers transpose Gemm weights and their strict
    shape re-inference then trips over the stale entries."""
    initializers = {t.name for t in model.graph.initializer}
    value_info = [v for v in model.graph.value_info if v.name not in initializers]
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(value_info)
    return model


def quantize_int8(spec: PartSpec, fp32_path: Path, int8_path: Path) -> str:
    """Write the dynamic-int8 variant of the fp32 ONNX part at `fp32_path`."""
    model = _without_stale_value_info(onnx.load(fp32_path))
    nodes = _scoped_nodes(spec, model, fp32_path)
    quantize_dynamic(
        model,
        int8_path,
        op_types_to_quantize=list(INT8_OP_TYPES),
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    return f"onnxruntime quantize_dynamic: {'/'.join(INT8_OP_TYPES)} {_where(spec)}"


class _Reader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of feeds."""

    def __init__(self, feeds: Feeds) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_static_qdq(spec: PartSpec, fp32_path: Path, int8_path: Path, feeds: Feeds, method: str = "MinMax") -> str:
    """Write the static-int8 QDQ variant of the fp32 ONNX part at `fp32_path`, calibrated on `feeds` (one dict
    of inputs per calibration image): int8 weights per channel, uint8 activations (x86's u8s8 kernels)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
    model = _without_stale_value_info(onnx.load(fp32_path))
    quantize_static(
        model,
        int8_path,
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(STATIC_OP_TYPES),
        nodes_to_quantize=static_nodes(spec, model, fp32_path),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
    )
    ops = "/".join(STATIC_OP_TYPES)
    return f"onnxruntime quantize_static QDQ ({method}, {len(feeds)} images): {ops} {_where(spec)}"


def _nncf_ignored(spec: PartSpec, model, onnx_model: onnx.ModelProto, path: Path) -> list[str]:
    """The OpenVINO operations NNCF leaves fp32: those of ONNX nodes outside the part's scopes (OpenVINO names
    an operation it reads after its ONNX node, "<node>" or "<node>/<step>"), and the first and the last
    MatMul or Convolution of the rest."""
    ops = model.get_ordered_ops()
    outside = set()
    if (scoped := _scoped_nodes(spec, onnx_model, path)) is not None:
        inside = set(scoped)
        outside = {n.name for n in onnx_model.graph.node if n.name not in inside}
    ignored = [op.get_friendly_name() for op in ops if op.get_friendly_name().split("/")[0] in outside]
    skipped = set(ignored)
    quantisable = [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() in ("MatMul", "Convolution") and op.get_friendly_name() not in skipped
    ]
    return ignored + sorted(_first_and_last(quantisable))


def quantize_nncf(spec: PartSpec, fp32_path: Path, int8_path: Path, feeds: Feeds) -> str:
    """Write NNCF's static-int8 OpenVINO IR (`int8_path`: its .xml, the weights beside it in the .bin) of the
    fp32 ONNX part at `fp32_path`, calibrated on `feeds`: transformer mode for CLIP and the head, without
    SmoothQuant.

    NNCF quantises the model as OpenVINO reads it (its OpenVINO backend), not the ONNX: on the full-size CLIP
    tower with 32 calibration images the same fidelity in 55 s and 6.5 GB, where its ONNX backend took
    15.7 GB and more than twice as long. SmoothQuant (transformer mode's default, alpha 0.95) cut that tower's
    cosine min from 0.9988 to 0.990 (seeded weights, no outlier channels to smooth; 16 images judged): off.
    The weights it does not quantise stay fp32 in the IR (no fp16 compression).
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    nncf.set_log_level(logging.WARNING)  # its INFO lines, one per step, would drown the export's own log
    model = ov.Core().read_model(str(fp32_path))
    ignored = _nncf_ignored(spec, model, onnx.load(fp32_path, load_external_data=False), fp32_path)
    transformer = spec.name in NNCF_TRANSFORMERS
    quantized = nncf.quantize(
        model,
        nncf.Dataset(list(feeds)),
        subset_size=len(feeds),
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)  # -1: off
        ),
    )
    ov.save_model(quantized, str(int8_path), compress_to_fp16=False)
    mode = "transformer mode, no SmoothQuant" if transformer else "default mode"
    return f"nncf.quantize on OpenVINO's model ({mode}, {len(feeds)} images) {_where(spec)}"
