"""The CLIP branch: OpenAI CLIP ViT-L/14's visual tower, built by open_clip, on the 224 centre crop."""

from __future__ import annotations

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import nn

from d3qe_serve.d3qe.config import CLIPConfig


class CLIPBranch(nn.Module):
    """x [B, 3, S, S] in [0, 1] → CLIP image feature [B, output_dim]. Its only parameters live in `visual`."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        vision_cfg = CLIPVisionCfg(
            layers=cfg.layers,
            width=cfg.width,
            head_width=cfg.head_width,
            mlp_ratio=cfg.mlp_ratio,
            patch_size=cfg.patch_size,
            image_size=cfg.image_size,
        )
        # open_clip's own builder, so the tower is exactly its `ViT-L-14-quickgelu` (QuickGELU, pre-LN, tok pool).
        self.visual = _build_vision_tower(cfg.output_dim, vision_cfg, quick_gelu=True)
        self.crop = cfg.image_size
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = round((x.shape[-2] - self.crop) / 2)
        left = round((x.shape[-1] - self.crop) / 2)
        x = x[..., top : top + self.crop, left : left + self.crop]
        return self.visual((x - self.mean) / self.std)
