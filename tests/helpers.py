"""What several test modules use: the fixture's tolerance, hand-made inputs, repository copies."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

LOGIT_TOL = 1e-4  # fixtures/REFERENCE.md: the fp32 CPU implementation against the authors' code


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but carries no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def image_input(images: list[bytes]) -> grpcclient.InferInput:
    t = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return t


def pixels_input(pixels: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput("PIXELS", list(pixels.shape), "FP32")
    t.set_data_from_numpy(pixels)
    return t


def copy_models(src: Path, dest: Path, *models: str) -> Path:
    """A repository holding only `models` of `src` (and its manifest)."""
    for model in models:
        shutil.copytree(src / model, dest / model)
    shutil.copy(src / "manifest.json", dest / "manifest.json")
    return dest


def write_video(path: Path, frames: list[np.ndarray], rate: int) -> Path:
    """H.264 RGB at qp 0 (libx264rgb): lossless, so decoding gives back exactly `frames`."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def export_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """`checkpoint` exported by `d3qe export` (ONNX Runtime fp32) to `folder`/model_repository: a complete Triton
    repository."""
    from d3qe_serve.cli.main import main

    out = folder / "model_repository"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out
