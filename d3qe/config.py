"""Architecture sizes of D³QE as data: presets, and inference from a checkpoint's tensor shapes."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

FREQ_BIAS_MODES = ("reference", "stats")


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ-16 encoder and quantiser."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8


@dataclass(frozen=True)
class CLIPConfig:
    """OpenAI CLIP ViT-L/14 visual tower, as open_clip's `ViT-L-14-quickgelu` builds it."""

    width: int = 1024
    layers: int = 24
    head_width: int = 64
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.0
    output_dim: int = 768


@dataclass(frozen=True)
class HeadConfig:
    """The detector head: D³AT over the VQ residual, fused with the CLIP feature."""

    dim: int = 512
    depth: int = 2
    head_dim: int = 64
    mlp_dim: int = 2048
    num_tokens: int = 256
    proj_dim: int = 256
    fc_dim: int = 128


@dataclass(frozen=True)
class D3QEConfig:
    vq: VQConfig = field(default_factory=VQConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image_size: int = 256

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> D3QEConfig:
        raw = json.loads(text)
        vq = dict(raw["vq"], channel_mult=tuple(raw["vq"]["channel_mult"]))
        return cls(VQConfig(**vq), CLIPConfig(**raw["clip"]), HeadConfig(**raw["head"]), raw["image_size"])


PRESETS: dict[str, D3QEConfig] = {
    "full": D3QEConfig(),
    # The reference fixture's sizes (tests/fixtures/REFERENCE.md): small CLIP and VQ encoder, full head.
    "tiny": D3QEConfig(
        vq=VQConfig(base_channels=32, z_channels=64),
        clip=CLIPConfig(width=128, layers=2),
    ),
}


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integers captured by `pattern` over the state dict's keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> D3QEConfig:
    """Infer sizes from an inference state dict (upstream key names). Raises KeyError if a size key is absent."""
    enc = "vq_model.encoder."
    ch = state[enc + "conv_in.weight"].shape[0]
    levels = _count(state, r"vq_model\.encoder\.conv_blocks\.(\d+)\.")
    mult = tuple(state[f"{enc}conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    codebook = state["vq_model.quantize.embedding.weight"].shape
    vq = VQConfig(
        base_channels=ch,
        channel_mult=mult,
        num_res_blocks=_count(state, r"vq_model\.encoder\.conv_blocks\.0\.res\.(\d+)\."),
        z_channels=state[enc + "conv_out.weight"].shape[0],
        codebook_size=codebook[0],
        codebook_dim=codebook[1],
    )
    vis = "clip_model.visual."
    width = state[vis + "class_embedding"].shape[0]
    patch = state[vis + "conv1.weight"].shape[-1]
    grid = round((state[vis + "positional_embedding"].shape[0] - 1) ** 0.5)
    clip = CLIPConfig(
        width=width,
        layers=_count(state, r"clip_model\.visual\.transformer\.resblocks\.(\d+)\."),
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=state[vis + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        output_dim=state[vis + "proj"].shape[1],
    )
    d3at = "feature_processor.3."
    head = HeadConfig(
        dim=state["feature_processor.0.weight"].shape[0],
        depth=_count(state, r"feature_processor\.3\.layers\.(\d+)\."),
        head_dim=state[d3at + "layers.0.W_q.weight"].shape[0],
        mlp_dim=state[d3at + "layers.0.mlp.0.weight"].shape[0],
        num_tokens=state[d3at + "pos_embed"].shape[1],
        proj_dim=state["mixed_proj.1.weight"].shape[0],
        fc_dim=state["fc.1.weight"].shape[0],
    )
    return D3QEConfig(vq=vq, clip=clip, head=head)
