"""Untrusted image bytes: each bad kind gets a clear ImageError; odd-but-valid modes are converted as upstream."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from d3qe_serve import d3qe
from d3qe_serve.d3qe.preprocess import MAX_PIXELS
from tests.helpers import png_header_only


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty image"),
        (b"hello, this is a text file\n", "not a decodable image"),
        (png_header_only(20000, 20000), "pixel limit|decompression bomb"),
        (_encode(Image.new("RGB", (1, 1)), "PNG"), "below the minimum"),
        (b"\x89PNG\r\n\x1a\n truncated", "truncated header"),
        (_encode(Image.new("RGB", (20000, 16)), "PNG"), "aspect ratio"),
    ],
    ids=["empty", "text", "bomb", "1x1", "png-signature-only", "sliver"],
)
def test_bad_images(data, match):
    with pytest.raises(d3qe.ImageError, match=match):
        d3qe.preprocess(data)


def test_truncated_jpeg(fixture_images):
    jpeg = next(p for p in fixture_images if p.suffix == ".jpg").read_bytes()
    with pytest.raises(d3qe.ImageError, match="truncated or corrupt"):
        d3qe.preprocess(jpeg[: len(jpeg) // 2])


def test_missing_path(tmp_path):
    with pytest.raises(d3qe.ImageError, match="no such image file"):
        d3qe.preprocess(tmp_path / "missing.png")


def test_bomb_limit_is_below_pil_default():
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "LA", "1"])
def test_other_modes_convert_like_upstream(mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    x = d3qe.preprocess(_encode(img, fmt))
    ref = d3qe.preprocess(Image.open(io.BytesIO(_encode(img, fmt))).convert("RGB"))
    assert x.shape == (3, 256, 256)
    assert (x - ref).abs().max() == 0


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ["red", "blue", "green"]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    x = d3qe.preprocess(buf.getvalue())
    assert x[0].mean() > 0.9 and x[2].mean() < 0.1
