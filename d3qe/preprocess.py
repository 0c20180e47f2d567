"""Image → model input, exactly as upstream's eval transform, with guards for untrusted bytes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from d3qe_serve.errors import ImageError

INPUT_SIZE = 256
# Limits for untrusted uploads: a 50-megapixel decode is ~150 MB of RGB; the minimum side rejects
# images too small to carry any evidence (a 1×1 upscaled to 256×256 is a flat colour).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000
MIN_SIDE = 16

# A path, encoded bytes, a PIL image, or decoded RGB pixels: a uint8 array [H, W, 3].
ImageSource = str | Path | bytes | Image.Image | np.ndarray


def _from_pixels(rgb: np.ndarray) -> Image.Image:
    """Decoded pixels as the PIL image a decoder would have returned (so both take the same path)."""
    if rgb.dtype != np.uint8:
        raise ImageError(f"RGB pixels must be uint8 (0-255), got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"RGB pixels must have shape [height, width, 3], got {list(rgb.shape)}")
    if rgb.shape[0] * rgb.shape[1] > MAX_PIXELS:  # checked again in load_image; here before any copy
        raise ImageError(f"image is {rgb.shape[1]}×{rgb.shape[0]} pixels, above the {MAX_PIXELS}-pixel limit")
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_pixels(source)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {path.stat().st_size} bytes, above the {MAX_IMAGE_BYTES}-byte limit")
        try:
            source = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e}") from e
    if not isinstance(source, bytes | bytearray | memoryview):
        raise ImageError(f"expected a path, bytes, a PIL image or a uint8 RGB array, got {type(source).__name__}")
    if len(source) == 0:
        raise ImageError("empty image: 0 bytes")
    if len(source) > MAX_IMAGE_BYTES:
        raise ImageError(f"image is {len(source)} bytes, above the {MAX_IMAGE_BYTES}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source))
    except UnidentifiedImageError as e:
        raise ImageError("not a decodable image (unknown or corrupt format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # a format's header parser failing on corrupt bytes
        raise ImageError(f"not a decodable image: corrupt or truncated header ({e})") from e


def load_image(source: ImageSource) -> Image.Image:
    """Decode (first frame of an animation) and check limits, then `convert("RGB")` as upstream does."""
    img = _open(source)
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"image is {w}×{h} = {w * h} pixels, above the {MAX_PIXELS}-pixel limit")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image is {w}×{h}, below the minimum of {MIN_SIDE} pixels per side")
    # The resize to a 256 short side must fit the same pixel budget (very elongated images).
    if INPUT_SIZE * int(INPUT_SIZE * max(w, h) / min(w, h)) > MAX_PIXELS:
        raise ImageError(f"image is {w}×{h}: aspect ratio too extreme to resize within the pixel limit")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"truncated or corrupt image data ({e})") from e


def preprocess(image: ImageSource) -> torch.Tensor:
    """Image → float32 [3, 256, 256] in [0, 1]: short side to 256 (PIL bilinear, antialiased), centre crop.

    No normalisation: the model takes [0, 1] pixels (upstream computes a [-1, 1] copy it never uses).
    """
    img = load_image(image)
    img = TF.resize(img, INPUT_SIZE, interpolation=TF.InterpolationMode.BILINEAR)
    img = TF.center_crop(img, INPUT_SIZE)
    return TF.to_tensor(img)
