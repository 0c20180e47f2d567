"""The D³QE detector: VQ residual → D³AT head, fused with the CLIP feature → one logit."""

from __future__ import annotations

import torch
from torch import nn

from d3qe_serve.d3qe.clip import CLIPBranch
from d3qe_serve.d3qe.config import FREQ_BIAS_MODES, D3QEConfig
from d3qe_serve.d3qe.d3at import D3AT
from d3qe_serve.d3qe.vq import VQModel


class D3QE(nn.Module):
    """x float32 [B, 3, 256, 256] in [0, 1] → logit [B, 1]; P(generated) = sigmoid(logit).

    Submodule and buffer names are the upstream checkpoint's, so its state dict loads as is.
    `freq_bias`: `reference` feeds D³AT zero frequencies, as upstream does after loading a checkpoint
    (its 200-step counter is not saved); `stats` uses the saved codebook counts, as training did.
    """

    def __init__(self, cfg: D3QEConfig, freq_bias: str = "reference") -> None:
        super().__init__()
        if freq_bias not in FREQ_BIAS_MODES:
            raise ValueError(f"freq_bias must be one of {FREQ_BIAS_MODES}, got {freq_bias!r}")
        self.cfg = cfg
        self.freq_bias = freq_bias
        h = cfg.head
        self.vq_model = VQModel(cfg.vq)
        self.clip_model = CLIPBranch(cfg.clip)
        self.register_buffer("real_codebook_count", torch.zeros(cfg.vq.codebook_size))
        self.register_buffer("fake_codebook_count", torch.zeros(cfg.vq.codebook_size))
        self.feature_processor = nn.Sequential(
            nn.Conv2d(cfg.vq.codebook_dim, h.dim, 3, padding=1), nn.BatchNorm2d(h.dim), nn.ReLU(), D3AT(h)
        )
        self.feature_pooler = nn.Sequential(
            nn.Conv2d(h.dim, h.dim, 1), nn.BatchNorm2d(h.dim), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.mixed_proj = nn.Sequential(nn.BatchNorm1d(h.dim), nn.Linear(h.dim, h.proj_dim), nn.ReLU())
        self.clip_proj = nn.Sequential(nn.Linear(cfg.clip.output_dim, h.proj_dim), nn.ReLU())
        self.fc = nn.Sequential(
            nn.BatchNorm1d(2 * h.proj_dim),
            nn.Linear(2 * h.proj_dim, h.fc_dim),
            nn.ReLU(),
            nn.Dropout(0.0),
            nn.Linear(h.fc_dim, 1),
        )

    def code_frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each code's share of the real and of the fake training images' tokens: [codebook size] each."""
        real = self.real_codebook_count / (self.real_codebook_count.sum() + 1e-8)
        fake = self.fake_codebook_count / (self.fake_codebook_count.sum() + 1e-8)
        return real, fake

    def token_frequency(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, L] int64 → freq [B, L] float32: real minus fake code frequency, or zeros."""
        if self.freq_bias == "reference":
            return torch.zeros_like(indices, dtype=self.real_codebook_count.dtype)
        real, fake = self.code_frequencies()
        return (real - fake)[indices]

    def classify(self, residual: torch.Tensor, indices: torch.Tensor, clip_feat: torch.Tensor) -> torch.Tensor:
        """The head: residual [B, D, 16, 16], indices [B, 256], clip_feat [B, 768] → logit [B, 1]."""
        conv, bn, relu, d3at = self.feature_processor
        h = d3at(relu(bn(conv(residual))), self.token_frequency(indices))
        fused = torch.cat([self.mixed_proj(self.feature_pooler(h)), self.clip_proj(clip_feat)], dim=1)
        return self.fc(fused)

    def evidence(self, residual: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a reviewer looks at, per token of the 16×16 grid: residual [B, D, h, w], indices [B, h·w] →
        ERROR_MAP [B, h, w] (|z_q − z|, the quantization error's magnitude), ATTENTION [B, h, w] (the D³AT
        attention each token receives, averaged over layers, heads and queries), REAL_FREQ and FAKE_FREQ
        [B, h·w] (the token's code's share of the real and the fake training tokens)."""
        b, _, h, w = residual.shape
        conv, bn, relu, d3at = self.feature_processor
        attention = d3at.attention_received(relu(bn(conv(residual))), self.token_frequency(indices)).mean(dim=1)
        real, fake = self.code_frequencies()
        return residual.norm(dim=1), attention.reshape(b, h, w), real[indices], fake[indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual, indices = self.vq_model(x)
        return self.classify(residual, indices, self.clip_model(x))
