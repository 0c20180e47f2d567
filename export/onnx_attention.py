"""How `d3qe::freq_biased_attention` is written into ONNX.

Default: standard ops by the concatenation identity q·kᵀ/√d + γ·qb·kbᵀ = [q/√d, γ·qb]·[k, kb]ᵀ: one
attention with 2d-wide queries and keys, so no [L, L] bias is built beside the logits, and ONNX
Runtime's own graph optimiser sees plain MatMul/Softmax/MatMul (it folds the key transpose into its
fused MatMul).

`plugin=True`: one node `FreqBiasedAttention` in the custom domain `d3qe`, which TensorRT's ONNX parser
maps to the plugin of `export/tensorrt_plugin.py` (the node's op type is the plugin name, its
`plugin_namespace` attribute the plugin namespace, `aot` selects the ahead-of-time Triton kernel).
ONNX Runtime cannot run that node.
"""

from __future__ import annotations

import torch
from onnx import TensorProto
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

PLUGIN_NAMESPACE = "d3qe"
PLUGIN_NAME = "FreqBiasedAttention"
# A schema of our own (not registered with onnx) so that onnxscript can emit the node and type its output.
PLUGIN_SCHEMA = OpSchema(
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    1,
    doc="softmax(q·kᵀ/√d + gamma·qb·kbᵀ)·v, the TensorRT plugin d3qe::FreqBiasedAttention",
    inputs=[
        *(OpSchema.FormalParameter(name, "T") for name in ("q", "k", "v", "qb", "kb")),
        OpSchema.FormalParameter("gamma", "tensor(float)"),
    ],
    outputs=[OpSchema.FormalParameter("out", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
    attributes=[
        OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
        OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: the ahead-of-time compiled kernel"),
    ],
)
PLUGIN_OP = Op(Opset(PLUGIN_NAMESPACE, 1), PLUGIN_NAME, PLUGIN_SCHEMA)


def freq_biased_attention_onnx(q, k, v, qb, kb, gamma):
    gamma = op.CastLike(gamma, q)  # an fp32 parameter beside fp16 activations in a reduced-precision export
    one = op.CastLike(op.Constant(value_float=1.0), gamma)
    scale = op.Div(one, op.Sqrt(op.CastLike(op.Shape(q, start=-1), gamma)))
    queries = op.Concat(op.Mul(q, scale), op.Mul(qb, gamma), axis=-1)
    keys = op.Concat(k, kb, axis=-1)
    logits = op.MatMul(queries, op.Transpose(keys, perm=[0, 1, 3, 2]))
    return op.MatMul(op.Softmax(logits, axis=-1), v)


def freq_biased_attention_plugin(q, k, v, qb, kb, gamma):
    # The plugin reads γ as fp32 whatever the activations' precision (see export/tensorrt_plugin.py).
    return PLUGIN_OP(q, k, v, qb, kb, op.Cast(gamma, to=TensorProto.FLOAT), plugin_namespace=PLUGIN_NAMESPACE, aot=1)


def translation_table(*, plugin: bool = False) -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: standard ops, or with
    `plugin` the TensorRT plugin node."""
    translation = freq_biased_attention_plugin if plugin else freq_biased_attention_onnx
    return {torch.ops.d3qe.freq_biased_attention.default: translation}
