"""The images static int8 is calibrated on: a slice of the fidelity corpus held apart from the images it is
judged on (the export's validation pool, a tuner's judging slice), so that fidelity is never measured on
the images the quantiser fitted its scales to.

Items are named by their position in `export.corpus.corpus(seed=seed)` (all 554 items, in corpus order);
the manifest of a static-int8 part records those indices and the digest of those items (`CalibrationSet.record`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from d3qe_serve.contract import PIXELS
from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import PartSpec, eager_tensors

CHUNK = 8  # images through the eager model at a time, for the upstream tensors of a part that does not take pixels
# NNCF's default is 300. Full-size CLIP tower, NNCF with SmoothQuant: cosine min 0.979 with 16 images, 0.985 with
# 32 (8 others judged); as built now (no SmoothQuant), 32 images peaked at 9 GB RSS, export included.
CALIBRATION_IMAGES = 64


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed corpus images to calibrate on, with where they came from."""

    pixels: np.ndarray  # [N, 3, S, S] float32 in [0, 1], preprocessed as the server does
    indices: tuple[int, ...]  # positions in corpus(seed=seed)
    names: tuple[str, ...]
    seed: int
    digest: str  # export.corpus.corpus_digest of these items

    def __post_init__(self) -> None:
        if len(self.pixels) != len(self.indices) or len(self.names) != len(self.indices):
            raise ValueError(f"{len(self.pixels)} images for {len(self.indices)} indices, {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.indices)

    def record(self) -> dict:
        """What a manifest records of it (not the pixels)."""
        return {
            "source": "export.corpus",
            "seed": self.seed,
            "images": len(self),
            "indices": list(self.indices),
            "digest": self.digest,
        }


def calibration_set(count: int = CALIBRATION_IMAGES, *, exclude: Iterable[str] = (), seed: int = 0) -> CalibrationSet:
    """`count` corpus items spread evenly over the corpus, none of whose names is in `exclude`
    (the images fidelity is judged on: validation pool, a tuner's judging slice)."""
    from d3qe_serve.d3qe import preprocess
    from d3qe_serve.export.corpus import corpus, corpus_digest

    if count < 1:
        raise ValueError(f"a calibration set needs at least one image, got {count}")
    items = corpus(seed=seed)
    # a manifest's validation inputs name corpus items "corpus:<name>"; other names (user images) match nothing
    excluded = {name.removeprefix("corpus:") for name in exclude}
    free = [i for i, item in enumerate(items) if item.name not in excluded]
    if count > len(free):
        raise ValueError(f"{count} calibration images asked; the corpus has {len(free)} outside those excluded")
    # one from each of `count` equal bins, half-way into it: spread over every kind of the corpus order
    chosen = [free[int((k + 0.5) * len(free) / count)] for k in range(count)]
    picked = [items[i] for i in chosen]
    pixels = np.stack([preprocess(item.data).numpy() for item in picked]).astype(np.float32)
    return CalibrationSet(pixels, tuple(chosen), tuple(item.name for item in picked), seed, corpus_digest(picked))


def calibration_feeds(spec: PartSpec, model: D3QE, calibration: CalibrationSet) -> list[dict[str, np.ndarray]]:
    """One feed per calibration image (batch 1), by input name: the pixels themselves for a part that takes
    pixels, else the eager model's upstream tensors for those pixels (the head's RESIDUAL, INDICES, CLIP_FEAT)."""
    if spec.input_names == [PIXELS]:
        return [{PIXELS: calibration.pixels[i : i + 1]} for i in range(len(calibration))]
    feeds = []
    for start in range(0, len(calibration), CHUNK):
        tensors = eager_tensors(model, torch.from_numpy(calibration.pixels[start : start + CHUNK]))
        for i in range(len(tensors[PIXELS])):
            feeds.append({n: tensors[n][i : i + 1].numpy() for n in spec.input_names})
    return feeds
