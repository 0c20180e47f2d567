"""Reading the authors' checkpoints (untrusted input) and our safetensors inference weights."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from d3qe_serve.d3qe.config import PRESETS, D3QEConfig, config_from_state_dict
from d3qe_serve.d3qe.detector import D3QE
from d3qe_serve.errors import CheckpointError

# Keys of the upstream checkpoint that inference never reads.
_UNUSED_PREFIXES = (
    "vq_model.decoder.",
    "vq_model.post_quant_conv.",
    "vq_model.quantize.codebook_used",
)
_VQ_PREFIX = "vq_model."
_SAFETENSORS_FORMAT = "d3qe-inference"


def _unused(key: str) -> bool:
    if key.startswith("clip_model.") and not key.startswith("clip_model.visual."):
        return True  # CLIP's text tower
    return key.startswith(_UNUSED_PREFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from a `.pth`/`.pt` (`["model"]` or a bare state dict) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors and plain containers "
            f"(loaded with weights_only=True; checkpoints are untrusted input). Detail: {e}"
        ) from e
    except Exception as e:  # untrusted bytes: torch's readers fail in many ways (EOF, zip, index errors)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated ({e})") from e
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state dict, or a dict with one under 'model'")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: expected a state dict, but these entries are not tensors: {not_tensors[:10]}")
    return dict(obj)


def check_state_dict(state: Mapping[str, torch.Tensor], model: D3QE, source: str) -> None:
    """Raise one CheckpointError naming every missing, mis-shaped and unknown key."""
    expected = model.state_dict()
    problems = [f"missing: {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [
        f"wrong shape: {k} is {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems += [f"unknown: {k}" for k in state if k not in expected and not _unused(k)]
    if problems:
        listing = "\n  ".join(problems)
        raise CheckpointError(f"{source} does not fit the D³QE model ({len(problems)} problems):\n  {listing}")


def _config_for(state: Mapping[str, torch.Tensor], fallback: D3QEConfig) -> D3QEConfig:
    try:
        return config_from_state_dict(state)
    except (KeyError, IndexError):
        # A size key is missing: build the preset so that check_state_dict lists everything absent.
        return fallback


def _seeded_weights(model: D3QE, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif name.endswith("weight") or name.endswith("freq_scale"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for count in (model.real_codebook_count, model.fake_codebook_count):
            count.copy_(torch.randint(0, 1000, count.shape, generator=gen).float())


def load_detector(
    checkpoint: str | Path | None = None,
    vq_checkpoint: str | Path | None = None,
    *,
    preset: str = "full",
    freq_bias: str = "reference",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> D3QE:
    """The D³QE detector in eval mode.

    checkpoint: the authors' D³QE `.pth` (upstream key names), or our `.safetensors` inference weights.
    vq_checkpoint: LlamaGen's `vq_ds16_c2i.pt`; when given it replaces the checkpoint's `vq_model.*`.
    With no checkpoint, the `preset`'s sizes get seeded random weights, whose scores mean nothing.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    state: dict[str, torch.Tensor] = {}
    sources = []
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        sources.append(str(checkpoint))
    if vq_checkpoint is not None:
        vq = read_state_dict(vq_checkpoint)
        state = {k: v for k, v in state.items() if not k.startswith(_VQ_PREFIX)}
        state.update({_VQ_PREFIX + k: v for k, v in vq.items()})
        sources.append(str(vq_checkpoint))

    if checkpoint is None:
        warnings.warn(
            f"no D³QE checkpoint given: preset {preset!r} with random weights (seed {seed}); "
            "its scores mean nothing",
            stacklevel=2,
        )
        seeded = D3QE(PRESETS[preset], freq_bias=freq_bias)
        _seeded_weights(seeded, seed)
        if vq_checkpoint is None:
            return seeded.eval().to(device)
        state = {**{k: v for k, v in seeded.state_dict().items() if not k.startswith(_VQ_PREFIX)}, **state}
    model = D3QE(_config_for(state, PRESETS[preset]), freq_bias=freq_bias)
    check_state_dict(state, model, " + ".join(sources))
    model.load_state_dict({k: v for k, v in state.items() if not _unused(k)})
    return model.eval().to(device)


def save_inference_weights(model: D3QE, path: str | Path) -> Path:
    """Write the weights inference reads (upstream names) as safetensors, with the architecture in metadata."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(
        state, str(path), metadata={"format": _SAFETENSORS_FORMAT, "config": model.cfg.to_json()}
    )
    return path
