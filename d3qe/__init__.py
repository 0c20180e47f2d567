"""D³QE, the detector of images made by autoregressive generators (ICCV 2025), for serving."""

from d3qe_serve.d3qe.checkpoint import CheckpointError, load_detector, read_state_dict, save_inference_weights
from d3qe_serve.d3qe.config import PRESETS, D3QEConfig
from d3qe_serve.d3qe.detector import D3QE
from d3qe_serve.d3qe.preprocess import ImageError, load_image, preprocess

__all__ = [
    "D3QE",
    "PRESETS",
    "CheckpointError",
    "D3QEConfig",
    "ImageError",
    "load_detector",
    "load_image",
    "preprocess",
    "read_state_dict",
    "save_inference_weights",
]
