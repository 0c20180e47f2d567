"""`d3qe::freq_biased_attention`: softmax(q·kᵀ/√d + γ·qb·kbᵀ)·v as one custom op.

The math implementation is the reference (it is what the released code computes, two [B, H, Lq, Lk]
matrices and all) and runs on every device but CUDA, where the fused Triton kernel of
`d3qe.attention_kernel` runs instead. A fake implementation lets `torch.compile` and `torch.export`
trace the op without running it; `export/onnx_attention.py` writes it into ONNX.

The op is for inference, but it has a backward (by the math, recomputing the softmax) so that it
composes with autograd like any other op.
"""

from __future__ import annotations

import torch


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> None:
    """Raise ValueError naming the problem unless q, qb are [B, H, Lq, ·], k, kb, v [B, H, Lk, ·] of one
    floating dtype, q/k and qb/kb share their last dims, Lk > 0, and gamma is one floating number."""
    named = {"q": q, "k": k, "v": v, "qb": qb, "kb": kb}
    for name, t in named.items():
        if t.dim() != 4:
            raise ValueError(f"freq_biased_attention: {name} must be [B, H, L, D], got shape {tuple(t.shape)}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1 or not q.dtype.is_floating_point:
        raise ValueError(f"freq_biased_attention: q, k, v, qb, kb must share one floating dtype, got {dtypes}")
    if gamma.numel() != 1 or not gamma.dtype.is_floating_point:
        raise ValueError(
            f"freq_biased_attention: gamma must be one floating number, got {gamma.dtype} of shape {tuple(gamma.shape)}"
        )
    devices = {t.device for t in (*named.values(), gamma)}
    if len(devices) != 1:
        raise ValueError(f"freq_biased_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    expected = {
        "k": (*q.shape[:2], k.shape[2], q.shape[3]),
        "v": (*q.shape[:2], k.shape[2], v.shape[3]),
        "qb": (*q.shape[:3], qb.shape[3]),
        "kb": (*q.shape[:2], k.shape[2], qb.shape[3]),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"freq_biased_attention: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                f"for q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, qb {tuple(qb.shape)}"
            )
    if k.shape[2] == 0:
        raise ValueError("freq_biased_attention: the key sequence is empty, there is nothing to attend to")


@torch.library.custom_op("d3qe::freq_biased_attention", mutates_args=())
def freq_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """q, qb: [B, H, Lq, D], [B, H, Lq, Db]; k, kb, v: [B, H, Lk, D], [B, H, Lk, Db], [B, H, Lk, Dv];
    gamma: [1]. Returns [B, H, Lq, Dv] in the inputs' dtype."""
    check_inputs(q, k, v, qb, kb, gamma)
    return freq_biased_attention_math(q, k, v, qb, kb, gamma)


def _logits(
    q: torch.Tensor, k: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·kᵀ/√d + γ·qb·kbᵀ, qb·kbᵀ). γ takes the inputs' dtype: under autocast it stays an fp32 parameter."""
    bias = qb @ kb.transpose(-2, -1)
    return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + gamma.to(q.dtype) * bias, bias


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """softmax(q·kᵀ/√d + γ·qb·kbᵀ): [B, H, Lq, Lk], each query's weights over the keys."""
    return _logits(q, k, qb, kb, gamma)[0].softmax(dim=-1)


def freq_biased_attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    return attention_weights(q, k, qb, kb, gamma) @ v


@freq_biased_attention.register_kernel("cuda")
def _(q, k, v, qb, kb, gamma):
    check_inputs(q, k, v, qb, kb, gamma)
    # Imported here: Triton is only needed (and only installed with torch) where CUDA is.
    from d3qe_serve.d3qe.attention_kernel import freq_biased_attention_triton

    return freq_biased_attention_triton(q, k, v, qb, kb, gamma)


@freq_biased_attention.register_fake
def _(q, k, v, qb, kb, gamma):
    check_inputs(q, k, v, qb, kb, gamma)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out: torch.Tensor):
    """Gradients of softmax(S)·v with S = q·kᵀ·s + γ·qb·kbᵀ, recomputing the softmax from the inputs."""
    q, k, v, qb, kb, gamma = ctx.saved_tensors
    logits, bias = _logits(q, k, qb, kb, gamma)
    p = logits.softmax(dim=-1)
    grad_p = grad_out @ v.transpose(-2, -1)
    grad_s = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))
    scale, g = q.shape[-1] ** -0.5, gamma.to(q.dtype)
    grad_st = grad_s.transpose(-2, -1)
    return (
        (grad_s @ k) * scale,
        (grad_st @ q) * scale,
        p.transpose(-2, -1) @ grad_out,
        (grad_s @ kb) * g,
        (grad_st @ qb) * g,
        (grad_s * bias).sum().reshape(gamma.shape).to(gamma.dtype),
    )


freq_biased_attention.register_autograd(_backward, setup_context=_setup_context)
