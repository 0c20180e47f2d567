"""LlamaGen's VQ-16 tokenizer, inference half only: encoder, quant_conv and the nearest-code quantiser.

Parameter names match `vq_ds16_c2i.pt` (and `vq_model.*` in the D³QE checkpoint); no decoder is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3qe_serve.d3qe.config import VQConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 convolutions, scale C^-0.5."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)
        k = self.k(y).flatten(2).transpose(1, 2)
        v = self.v(y).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after zero-padding right and bottom by one (LlamaGen's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attn: bool, down: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attn else 0))
        self.downsample = Downsample(out_channels) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = (1, *cfg.channel_mult)
        last = len(cfg.channel_mult) - 1
        self.conv_blocks = nn.ModuleList(
            EncoderLevel(ch * in_mult[i], ch * m, cfg.num_res_blocks, attn=i == last, down=i != last)
            for i, m in enumerate(cfg.channel_mult)
        )
        top = ch * cfg.channel_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(top, top), AttnBlock(top), ResnetBlock(top, top)])
        self.norm_out = _group_norm(top)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Cosine nearest-code lookup over an L2-normalised codebook (LlamaGen's `l2_norm=True`)."""

    def __init__(self, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, H, W] → (residual z_q − z [B, D, H, W], indices [B, H·W] int64)."""
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), p=2, dim=-1)
        codebook = F.normalize(self.embedding.weight, p=2, dim=-1)
        # Squared distance written as upstream writes it, so near-ties break the same way.
        dist = flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * flat @ codebook.t()
        indices = dist.argmin(dim=1)
        residual = (codebook[indices] - flat).reshape(b, h, w, d).permute(0, 3, 1, 2)
        return residual, indices.reshape(b, h * w)


class VQModel(nn.Module):
    """The tokenizer as D³QE uses it: pixels in [0, 1] → quantisation residual and code indices."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(self.quant_conv(self.encoder(x)))
