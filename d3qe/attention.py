"""`d3qe::freq_biased_attention`: softmax(q·kᵀ/√d + γ·qb·kbᵀ)·v as one custom op.

The math implementation is the reference (it is what the released code computes, two [B, H, L, L]
matrices and all); other backends register against the same op.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("d3qe::freq_biased_attention", mutates_args=())
def freq_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """q, k, v, qb, kb: [B, H, L, D]; gamma: [1]. Returns [B, H, L, D]."""
    return freq_biased_attention_math(q, k, v, qb, kb, gamma)


def freq_biased_attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale + gamma * (qb @ kb.transpose(-2, -1))
    return logits.softmax(dim=-1) @ v


@freq_biased_attention.register_fake
def _(q, k, v, qb, kb, gamma):
    return torch.empty_like(q)
