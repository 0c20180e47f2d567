"""The torch runtime's artifact: one part's weights as safetensors (no pickles).

`serving.runtimes.TorchRunner` rebuilds the part's module from the manifest's config and fills it from this file.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import PartSpec


def save_torch_part(spec: PartSpec, model: D3QE, path: Path, dtype: torch.dtype) -> None:
    """Every tensor the part's module holds, non-persistent buffers (CLIP's mean/std) included."""
    module = spec.module(model, dtype)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
