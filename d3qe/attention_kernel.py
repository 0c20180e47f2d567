"""The fused D³ASA kernel: softmax(q·kᵀ/√d + γ·qb·kbᵀ)·v in OpenAI Triton, never storing an L×L matrix.

One program owns BLOCK_M query rows of one (batch, head) and walks the keys BLOCK_N at a time with an
online softmax (running max and sum, rescaled accumulator). Both dot products land in the same fp32
logits tile, so the frequency bias costs one more MMA per tile and no memory.

The same `@triton.jit` function serves three launchers: `freq_biased_attention_triton` (PyTorch
tensors: CUDA, or CPU under `TRITON_INTERPRET=1`), and `compile_kernel` (ahead of time, to PTX, for the
TensorRT plugin in `export/tensorrt_plugin.py`). Its parameters are ordered inputs, int32 scalars,
output, as TensorRT's AOT plugins launch kernels that way.
"""

# ruff: noqa: N803  (Triton convention: the kernel's compile-time constants are upper case)

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x·log2 e), folded into the logit scales

INPUTS = ("q", "k", "v", "qb", "kb", "gamma")
STRIDED = ("q", "k", "v", "qb", "kb", "out")  # each passes (batch, head, token) strides; the last dim is dense
SCALARS = (*(f"stride_{t}_{axis}" for t in STRIDED for axis in "bht"), "num_heads", "len_q", "len_k")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidate tilings for head dim 64 (FlashAttention-2 style). IEEE/TF32 fp32 tiles take about twice the
# shared memory and registers of 16-bit ones, so fp32 gets smaller tiles. Every one fits sm_80's 164 KiB of
# shared memory and none spills registers on sm_90 (ptxas -v, `resource_usage`; both checked by the AOT
# tests). Measured there (Triton 3.8, sm_90a, head dim 64), the tilings dropped: 16-bit 128×64 on 4 warps
# (255 registers, 288 B spilled), fp32 64×32 and 64×64 on 4 warps (255 registers, 116-1620 B spilled).
# The CUDA launcher picks one by `default_config`; the TensorRT plugin offers them all as tactics and lets
# the builder time them.
HALF_CONFIGS = (
    KernelConfig(64, 64, 4, 2),  # 255 registers on sm_90, no spill
    KernelConfig(128, 64, 8, 3),  # 193-197
    KernelConfig(128, 128, 8, 2),  # 226-227 (spills on sm_80: a tactic TensorRT times there, never the default)
)
FP32_CONFIGS = (
    KernelConfig(64, 32, 8, 2),  # 127 registers (IEEE) / 160 (TF32) on sm_90
    KernelConfig(32, 32, 4, 2),  # 148 / 143
)


def configs_for(dtype: torch.dtype) -> tuple[KernelConfig, ...]:
    return FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS


@triton.jit
def _load_tile(base, rows, row_stride, row_ok, cols, DIM: tl.constexpr):
    """rows × cols of a [L, DIM] matrix whose last dim is dense, zero outside rows < L and cols < DIM."""
    return tl.load(
        base + rows[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < DIM), other=0.0
    )


@triton.jit
def _freq_biased_attention_kernel(
    q_ptr, k_ptr, v_ptr, qb_ptr, kb_ptr, gamma_ptr,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_qb_b, stride_qb_h, stride_qb_t,
    stride_kb_b, stride_kb_h, stride_kb_t,
    stride_out_b, stride_out_h, stride_out_t,
    num_heads, len_q, len_k,
    out_ptr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BIAS_DIM: tl.constexpr, BIAS_PAD: tl.constexpr,
    VALUE_DIM: tl.constexpr, VALUE_PAD: tl.constexpr,
    SM_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 offsets: batch × head strides overflow int32 at serving batch sizes.
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d_head = tl.arange(0, HEAD_PAD)
    d_bias = tl.arange(0, BIAS_PAD)
    d_value = tl.arange(0, VALUE_PAD)
    row_ok = rows < len_q

    q = _load_tile(q_ptr + off_b * stride_q_b + off_h * stride_q_h, rows, stride_q_t, row_ok, d_head, HEAD_DIM)
    qb = _load_tile(qb_ptr + off_b * stride_qb_b + off_h * stride_qb_h, rows, stride_qb_t, row_ok, d_bias, BIAS_DIM)
    k_base = k_ptr + off_b * stride_k_b + off_h * stride_k_h
    kb_base = kb_ptr + off_b * stride_kb_b + off_h * stride_kb_h
    v_base = v_ptr + off_b * stride_v_b + off_h * stride_v_h
    qk_scale = SM_SCALE * LOG2E
    bias_scale = tl.load(gamma_ptr).to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, VALUE_PAD], dtype=tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        keys = start_n + cols
        key_ok = keys < len_k
        k = _load_tile(k_base, keys, stride_k_t, key_ok, d_head, HEAD_DIM)
        kb = _load_tile(kb_base, keys, stride_kb_t, key_ok, d_bias, BIAS_DIM)
        v = _load_tile(v_base, keys, stride_v_t, key_ok, d_value, VALUE_DIM)
        logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        logits += tl.dot(qb, tl.trans(kb), input_precision=INPUT_PRECISION) * bias_scale
        logits = tl.where(key_ok[None, :], logits, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_base = out_ptr + off_b * stride_out_b + off_h * stride_out_h
    tl.store(
        out_base + rows[:, None] * stride_out_t + d_value[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (d_value[None, :] < VALUE_DIM),
    )


def padded(dim: int) -> int:
    """tl.arange wants a power of two and tl.dot at least 16: head dims are padded (and masked) to that."""
    return max(16, triton.next_power_of_2(dim))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's CUDA matmul precision ("tf32", else IEEE fp32); 16-bit dots are "ieee".

    Read through the per-backend API (`torch.backends.cuda.matmul.fp32_precision`), which also reflects the
    legacy `torch.set_float32_matmul_precision`: the legacy getter raises once the new API has set anything
    (`serving.runtimes.cuda_fp32` does), so it is never called here. "none" inherits the global setting.
    """
    if dtype != torch.float32:
        return "ieee"
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def constexprs(head_dim: int, bias_dim: int, value_dim: int, precision: str, config: KernelConfig) -> dict:
    return {
        "HEAD_DIM": head_dim,
        "HEAD_PAD": padded(head_dim),
        "BIAS_DIM": bias_dim,
        "BIAS_PAD": padded(bias_dim),
        "VALUE_DIM": value_dim,
        "VALUE_PAD": padded(value_dim),
        "SM_SCALE": head_dim**-0.5,
        "INPUT_PRECISION": precision,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
    }


def default_config(dtype: torch.dtype, programs_at_128: int, num_sms: int) -> KernelConfig:
    """A tiling by rule of thumb (not tuned on a GPU here): 128-row tiles once they fill every SM, 64 below
    that (small batches). At D³AT's 8 heads of 256 tokens on an H100's 132 SMs the switch is at batch 9:
    both tilings are compiled on first use, so a warm-up covers batches on each side (`switch_batch`)."""
    if dtype == torch.float32:
        return FP32_CONFIGS[0]
    return HALF_CONFIGS[1] if programs_at_128 >= num_sms else HALF_CONFIGS[0]


def switch_batch(heads: int, len_q: int, num_sms: int) -> int:
    """The smallest batch at which `default_config` takes the 128-row tiling for 16-bit inputs."""
    return triton.cdiv(num_sms, heads * triton.cdiv(len_q, 128))


def freq_biased_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qb: torch.Tensor,
    kb: torch.Tensor,
    gamma: torch.Tensor,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on [B, H, L, D] tensors (shapes checked by the op); returns [B, H, Lq, Dv]."""
    q, k, v, qb, kb = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, qb, kb))
    batch, heads, len_q, head_dim = q.shape
    out = q.new_empty((batch, heads, len_q, v.shape[-1]))
    if out.numel() == 0:
        return out
    if config is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        config = default_config(q.dtype, batch * heads * triton.cdiv(len_q, 128), num_sms)
    strides = [s for t in (q, k, v, qb, kb, out) for s in t.stride()[:3]]
    grid = (triton.cdiv(len_q, config.block_m), batch * heads)
    # Triton launches on the current device (and torch's current stream there).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _freq_biased_attention_kernel[grid](
            q, k, v, qb, kb, gamma, *strides, heads, len_q, k.shape[2], out,
            **constexprs(head_dim, qb.shape[-1], v.shape[-1], input_precision(q.dtype), config),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return out


TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_kernel(
    dtype: torch.dtype,
    gamma_dtype: torch.dtype,
    dims: tuple[int, int, int],
    config: KernelConfig,
    target: GPUTarget | None = None,
    precision: str | None = None,
) -> triton.compiler.CompiledKernel:
    """Compile the kernel ahead of time for contiguous tensors of `dtype`, head dims (D, Db, Dv), on
    `target` (default: the current GPU), its dots at `precision` ("ieee" or "tf32"; default
    `input_precision(dtype)`). All scalars are int32, as TensorRT passes them."""
    pointer, gamma_pointer = f"*{TRITON_DTYPES[dtype]}", f"*{TRITON_DTYPES[gamma_dtype]}"
    consts = constexprs(*dims, precision or input_precision(dtype), config)
    signature = {
        **{f"{name}_ptr": gamma_pointer if name == "gamma" else pointer for name in INPUTS},
        **dict.fromkeys(SCALARS, "i32"),
        "out_ptr": pointer,
        **dict.fromkeys(consts, "constexpr"),
    }
    source = triton.compiler.ASTSource(fn=_freq_biased_attention_kernel, signature=signature, constexprs=consts)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=target, options=options)
    # An AOT launcher passes only the kernel's own arguments, no scratch buffers.
    scratch = compiled.metadata.global_scratch_size + getattr(compiled.metadata, "profile_scratch_size", 0)
    if scratch:
        raise RuntimeError(f"the compiled kernel needs {scratch} B of Triton scratch memory, which AOT launches lack")
    return compiled


def aot_ptx(kernel: triton.compiler.CompiledKernel) -> str:
    """The kernel's PTX with an entry taking exactly its own arguments (inputs, scalars, output), the way
    AOT launchers such as TensorRT's pass them. Triton 3.3+ appends scratch-buffer pointers; they are
    dropped here, after checking that the kernel never reads them."""
    ptx = kernel.asm["ptx"]
    entry = re.search(rf"\.entry {re.escape(kernel.metadata.name)}\((.*?)\)", ptx, re.S)
    params = [p.strip() for p in entry.group(1).split(",")]
    own = len(INPUTS) + len(SCALARS) + 1
    for extra in params[own:]:
        name = extra.split()[-1]
        if len(re.findall(rf"\b{name}\b", ptx)) > 1:
            raise RuntimeError(f"the compiled kernel reads its trailing parameter {name}, which AOT launches lack")
    kept = ",\n\t".join(params[:own])
    return ptx[: entry.start(1)] + f"\n\t{kept}\n" + ptx[entry.end(1) :]


@dataclass(frozen=True)
class ResourceUsage:
    """What ptxas reports for one compiled kernel: registers per thread, spilled bytes, stack frame."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


def resource_usage(kernel: triton.compiler.CompiledKernel) -> ResourceUsage:
    """Assemble the kernel's PTX again with `ptxas -v` (Triton's own, for its target; no GPU needed) and read
    its resource report: a spill moves registers to local memory, slow on every GPU."""
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target (\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory(prefix="d3qe-ptxas-") as tmp:
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        argv = [triton.knobs.nvidia.ptxas.path, "-v", f"-arch={arch}", "kernel.ptx", "-o", "kernel.cubin"]
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=False)
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on {kernel.metadata.name}: {report.strip()[-2000:]}")

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no {pattern!r}: {report.strip()[-2000:]}")
        return int(found.group(1))

    return ResourceUsage(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_frame=number(r"(\d+) bytes stack frame"),
    )
