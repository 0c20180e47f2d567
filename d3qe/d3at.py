"""D³AT: the transformer over VQ-residual tokens whose attention is biased by codebook frequencies."""

from __future__ import annotations

import torch
from torch import nn

from d3qe_serve.d3qe.attention import attention_weights, freq_biased_attention
from d3qe_serve.d3qe.config import HeadConfig


class FreqBiasedBlock(nn.Module):
    """Pre-LN block whose attention logits get γ·qb·kbᵀ, with qb, kb projected from per-token frequency."""

    def __init__(self, dim: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.freq_scale = nn.Parameter(torch.ones(1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.freq_proj = nn.Sequential(nn.Linear(1, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim))
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim))
        # Shared by all heads: they act on each head's 64-wide slice of the frequency embedding.
        self.W_q = nn.Linear(head_dim, head_dim)
        self.W_k = nn.Linear(head_dim, head_dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _projections(self, x: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [B, H, L, D] from the tokens; qb, kb [B, H, L, D] from the frequencies."""
        q, k, v = (self._heads(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        fb = self._heads(self.freq_proj(freq.unsqueeze(-1)))
        return q, k, v, self.W_q(fb), self.W_k(fb)

    def _rest(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block after attention: output projection, residual, MLP."""
        b, n, c = x.shape
        x = x + self.out_proj(attended.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], freq [B, L] → [B, L, C]."""
        q, k, v, qb, kb = self._projections(x, freq)
        return self._rest(x, freq_biased_attention(q, k, v, qb, kb, self.freq_scale))

    def forward_with_weights(self, x: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` by the math, also returning its attention weights [B, H, L, L] (the fused op keeps none)."""
        q, k, v, qb, kb = self._projections(x, freq)
        weights = attention_weights(q, k, qb, kb, self.freq_scale)
        return self._rest(x, weights @ v), weights


class D3AT(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.layers = nn.ModuleList(FreqBiasedBlock(cfg.dim, cfg.head_dim, cfg.mlp_dim) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] feature map, freq [B, H·W] → [B, C, H, W]."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            tokens = layer(tokens, freq)
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def attention_received(self, x: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], freq [B, H·W] → [B, depth, H·W]: the attention each token receives in each layer,
        averaged over the heads and the queries (a row of weights sums to 1, so these average 1 / (H·W))."""
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed
        received = []
        for layer in self.layers:
            tokens, weights = layer.forward_with_weights(tokens, freq)
            received.append(weights.mean(dim=(1, 2)))
        return torch.stack(received, dim=1)
