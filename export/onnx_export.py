"""One part of a loaded D³QE → an ONNX file, through `torch.onnx.export(dynamo=True)`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import PartSpec
from d3qe_serve.export import onnx_attention

TRACE_BATCH = 2  # a batch that is neither 0 nor 1, so the exporter keeps the axis symbolic
PROTOBUF_LIMIT = 2**31  # an ONNX file holds at most 2 GiB; bigger weights go to external data


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None, enable_gqa=False
):
    """torchlib's SDPA takes only 4-D tensors; the VQ encoder's single-head AttnBlock calls it with 3-D ones."""
    if len(query.shape) == 4:
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("3-D scaled_dot_product_attention is translated without mask, dropout or causality")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scale = op.CastLike(op.Constant(value_float=scale), query)
    logits = op.MatMul(op.Mul(query, scale), op.Transpose(key, perm=[0, 2, 1]))
    return op.MatMul(op.Softmax(logits, axis=-1), value)


def translation_table(plugin: bool = False) -> dict:
    """The kernel engineer's D³AT translation (a TensorRT plugin node when `plugin`), plus 3-D SDPA."""
    table = onnx_attention.translation_table(plugin=plugin)
    return {**table, torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention}


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def export_onnx(
    spec: PartSpec,
    model: D3QE,
    path: Path,
    max_batch: int,
    dtype: torch.dtype = torch.float32,
    plugin: bool = False,
) -> None:
    """Write `spec`'s part of `model`, computing in `dtype`, to `path` (weights over 2 GiB beside it)."""
    module = spec.module(model, dtype)
    args = tuple(spec.random_inputs(model.cfg, TRACE_BATCH).values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # All inputs share the one batch axis; the exporter says so for each extra input. Harmless.
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes(max_batch),
            custom_translation_table=translation_table(plugin),
            opset_version=spec.opset,
            verbose=False,
        )
    program.save(path, external_data=parameter_bytes(module) >= PROTOBUF_LIMIT * 0.9)
