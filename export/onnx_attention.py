"""How `d3qe::freq_biased_attention` is written into ONNX.

Standard ops by the concatenation identity q·kᵀ/√d + γ·qb·kbᵀ = [q/√d, γ·qb]·[k, kb]ᵀ: one
attention with 2d-wide queries and keys, so no [L, L] bias is built beside the logits.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op


def freq_biased_attention_onnx(q, k, v, qb, kb, gamma):
    scale = op.Div(op.Constant(value_float=1.0), op.Sqrt(op.CastLike(op.Shape(q, start=-1), gamma)))
    queries = op.Concat(op.Mul(q, scale), op.Mul(qb, gamma), axis=-1)
    keys = op.Concat(k, kb, axis=-1)
    logits = op.MatMul(queries, op.Transpose(keys, perm=[0, 1, 3, 2]))
    return op.MatMul(op.Softmax(logits, axis=-1), v)


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`."""
    return {torch.ops.d3qe.freq_biased_attention.default: freq_biased_attention_onnx}
