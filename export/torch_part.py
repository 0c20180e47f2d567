"""The torch runtime's artifact: one part's weights as safetensors (no pickles), rebuilt from the config."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from d3qe import D3QE
from d3qe.config import D3QEConfig
from export.parts import PartSpec


def save_torch_part(spec: PartSpec, model: D3QE, path: Path, dtype: torch.dtype) -> None:
    """Every tensor the part's module holds, non-persistent buffers (CLIP's mean/std) included."""
    module = spec.module(model, dtype)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def load_torch_part(
    spec: PartSpec, cfg: D3QEConfig, freq_bias: str, dtype: torch.dtype, path: Path, device: str = "cpu"
) -> torch.nn.Module:
    """The part's module, built on the meta device (no random init) and filled from `path`."""
    tensors = safetensors.torch.load_file(str(path), device=device)
    with torch.device("meta"):
        module = spec.module(D3QE(cfg, freq_bias=freq_bias), dtype)
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    missing = sorted(expected.keys() - tensors.keys())
    unknown = sorted(tensors.keys() - expected.keys())
    if missing or unknown:
        raise ValueError(f"{path} does not hold the {spec.name} part: missing {missing[:10]}, unknown {unknown[:10]}")
    persistent = module.state_dict().keys()
    module.load_state_dict({k: tensors[k] for k in persistent}, strict=True, assign=True)
    for name in expected.keys() - persistent:
        owner, _, attr = name.rpartition(".")
        module.get_submodule(owner).register_buffer(attr, tensors[name], persistent=False)
    return module.eval()
