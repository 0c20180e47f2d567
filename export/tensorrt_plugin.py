"""TensorRT plugin `d3qe::FreqBiasedAttention` on the quickly-deployable plugin API (`tensorrt.plugin`).

Importing this module registers the plugin. Its implementation is ahead of time: the fused Triton
kernel of `d3qe.attention_kernel`, compiled to PTX at engine build and baked into the engine, so the
engine runs without Python. The ONNX node that maps to it comes from
`export.onnx_attention.translation_table(plugin=True)`.

Each tiling in `d3qe.attention_kernel.configs_for(dtype)` is a tactic (1-based); the builder times them
and keeps the fastest. Written to NVIDIA's documented API; TensorRT is not installable on the machines
this was written on, so it has not been run.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from d3qe_serve.d3qe.attention_kernel import aot_ptx, compile_kernel, configs_for
from d3qe_serve.export.onnx_attention import PLUGIN_NAME, PLUGIN_NAMESPACE

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
TORCH_DTYPES = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}


@trtp.register(PLUGIN_ID)
def freq_biased_attention_desc(
    q: trtp.TensorDesc,
    k: trtp.TensorDesc,
    v: trtp.TensorDesc,
    qb: trtp.TensorDesc,
    kb: trtp.TensorDesc,
    gamma: trtp.TensorDesc,
) -> trtp.TensorDesc:
    """q, qb [B, H, Lq, ·]; k, kb, v [B, H, Lk, ·]; gamma [1] fp32 → out [B, H, Lq, Dv] in q's dtype."""
    return trtp.from_shape_expr((*q.shape_expr[:3], v.shape_expr[3]), dtype=q.dtype)


@trtp.autotune(PLUGIN_ID)
def freq_biased_attention_autotune(q, k, v, qb, kb, gamma, outputs) -> list[trtp.AutoTuneCombination]:
    """All activations and the output share one dtype; gamma is always fp32; all LINEAR (dense)."""
    combinations = []
    for types, dtype in (("FP16|BF16", torch.float16), ("FP32", torch.float32)):
        io_types = ", ".join([types] * 5 + ["FP32", types])
        tactics = range(1, len(configs_for(dtype)) + 1)
        combinations.append(trtp.AutoTuneCombination(io_types, "LINEAR", tactics))
    return combinations


def _static(dim: trtp.ShapeExpr, what: str) -> int:
    if not dim.is_constant:
        raise ValueError(f"{PLUGIN_ID}: the {what} must be static (it is compiled into the kernel)")
    return dim.constant_value()


def _dense_strides(t: trtp.TensorDesc) -> list[trtp.ShapeExpr]:
    """(batch, head, token) strides of a dense [B, H, L, D] tensor."""
    _, heads, length, dim = t.shape_expr
    return [heads * length * dim, length * dim, dim]


@trtp.aot_impl(PLUGIN_ID)
def freq_biased_attention_aot(
    q, k, v, qb, kb, gamma, outputs, tactic: int
) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    """(kernel name, PTX, launch parameters, int32 scalars) for `tactic`; inputs are TensorDescs as above."""
    dtype = TORCH_DTYPES[q.dtype]
    configs = configs_for(dtype)
    if not 1 <= tactic <= len(configs):
        raise ValueError(f"{PLUGIN_ID}: tactic {tactic} is not one of 1..{len(configs)} for {dtype}")
    config = configs[tactic - 1]
    dims = tuple(_static(t.shape_expr[3], f"{name} head dim") for name, t in (("q", q), ("qb", qb), ("v", v)))
    kernel = compile_kernel(dtype, TORCH_DTYPES[gamma.dtype], dims, config)

    batch, heads, len_q, _ = q.shape_expr
    # The kernel's int32 scalars in the order of `d3qe.attention_kernel.SCALARS`; TensorRT passes the
    # inputs, these, then the output.
    scalars = [s for t in (q, k, v, qb, kb, outputs[0]) for s in _dense_strides(t)] + [heads, len_q, k.shape_expr[2]]
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])

    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(len_q, config.block_m)
    launch.grid_y = batch * heads
    launch.block_x = kernel.metadata.num_warps * 32
    launch.shared_mem = kernel.metadata.shared
    return kernel.metadata.name.encode(), aot_ptx(kernel).encode(), launch, extra_args
