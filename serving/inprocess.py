"""The model in this process: the options that choose its weights, building it, and scoring with it.

Two in-process scorers, each giving one `ScoreResult` per image in input order, a failed image in its own
slot: the eager model (`score_eager`; `open_eager` builds it from `WeightOptions`), and an export's parts
chained here as the ensemble wires them (`score_exported`; `open_exported` loads them, as `d3qe bulk`'s
actors do). Torch and the model are imported only when a scorer is opened or called, so importing this
module costs no start-up time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from d3qe_serve.client.results import DEFAULT_THRESHOLD, Item, Scorer, ScoreResult
from d3qe_serve.contract import LOGIT, PIXELS
from d3qe_serve.errors import D3QEServeError, ManifestError, MissingDependencyError, NotFoundError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d3qe_serve.d3qe import D3QE
    from d3qe_serve.serving.runtimes import PartRunner


@dataclass(frozen=True)
class WeightOptions:
    """Which weights the model gets: the authors' checkpoint (or our safetensors) and LlamaGen's VQ file, else
    seeded random weights of `preset`; `freq_bias` as `d3qe.load_detector` takes it. Checked by `load_detector`."""

    checkpoint: str | Path | None = None
    vq_checkpoint: str | Path | None = None
    preset: str = "full"
    seed: int = 0
    freq_bias: str = "reference"

    def load(self) -> D3QE:
        """The detector these options name, in eval mode on the CPU."""
        from d3qe_serve.d3qe import load_detector

        return load_detector(
            self.checkpoint, self.vq_checkpoint, preset=self.preset, freq_bias=self.freq_bias, seed=self.seed
        )


def _score_in_batches(
    items: Iterable[Item], forward: Callable[[torch.Tensor], list[float]], threshold: float, batch_size: int
) -> Iterator[ScoreResult]:
    """Preprocess (source, image) pairs and score them `batch_size` at a time with `forward` (pixels → logits),
    one result per item in input order: an image that fails to load keeps its slot among the batch's others."""
    import torch

    from d3qe_serve.d3qe import ImageError, preprocess

    # The items since the last forward pass, in order: each its pixels, or its failure already known.
    waiting: list[tuple[str, torch.Tensor | ScoreResult]] = []
    loaded = 0

    def flush() -> Iterator[ScoreResult]:
        pixels = [x for _, x in waiting if not isinstance(x, ScoreResult)]
        logits = iter(forward(torch.stack(pixels)) if pixels else [])
        for source, x in waiting:
            yield x if isinstance(x, ScoreResult) else ScoreResult.from_logit(source, next(logits), threshold)
        waiting.clear()

    for source, image in items:
        try:
            waiting.append((source, preprocess(image)))
            loaded += 1
        except ImageError as e:
            waiting.append((source, ScoreResult.failed(source, str(e))))
        if loaded == batch_size or not loaded:  # a full batch, or only failures waiting: nothing to hold them for
            yield from flush()
            loaded = 0
    yield from flush()


def score_eager(
    model: torch.nn.Module, items: Iterable[Item], threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8
) -> Iterator[ScoreResult]:
    """Preprocess and score (source, bytes, path or uint8 pixels) pairs in batches, one result each in input
    order; an image that fails to load is reported in its slot and its batch goes on."""
    import torch

    def forward(pixels: torch.Tensor) -> list[float]:
        with torch.inference_mode():
            return model(pixels).squeeze(1).tolist()

    return _score_in_batches(items, forward, threshold, batch_size)


def load_exported(
    repo: Path, device: str = "cpu", threads: int | None = None, compile: bool = False
) -> dict[str, PartRunner]:
    """The runners of the parts the scoring ensemble chains (`d3qe.parts.PART_NAMES`), each artifact checked
    against the manifest (`serving.runtimes.load_part`; `compile`: torch-runtime parts compiled)."""
    from d3qe_serve.d3qe.parts import PART_NAMES
    from d3qe_serve.serving.runtimes import load_part

    return {part: load_part(Path(repo), part, device, threads, compile) for part in PART_NAMES}


def run_parts(runners: Mapping[str, PartRunner], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PIXELS through vq_encoder and clip_visual into d3qe_head, as the ensemble wires them: every tensor."""
    from d3qe_serve.d3qe.parts import PART_NAMES

    tensors = {PIXELS: pixels}
    for part in PART_NAMES:
        tensors.update(runners[part]({n: tensors[n] for n in runners[part].input_names}))
    return tensors


def score_exported(
    runners: Mapping[str, PartRunner],
    items: Iterable[Item],
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
) -> Iterator[ScoreResult]:
    """`score_eager` with an export's parts (`load_exported`) in place of the eager model: forward passes of
    `batch_size` images, fewer where the export takes fewer (its max batch)."""
    size = min(batch_size, *(r.max_batch for r in runners.values()))

    def forward(pixels: torch.Tensor) -> list[float]:
        return run_parts(runners, pixels.numpy())[LOGIT].reshape(-1).tolist()

    return _score_in_batches(items, forward, threshold, size)


def _require(modules: tuple[str, ...], extra: str, what: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{what} needs {', '.join(missing)}: pip install 'd3qe-serve[{extra}]'")


def open_eager(weights: WeightOptions, *, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8) -> Scorer:
    """The eager model of `weights`, built here, as a `Scorer` (`score_eager`). Needs the `model` extra."""
    _require(("torch",), "model", "the eager model in this process")
    model = weights.load()
    return lambda items: score_eager(model, items, threshold, batch_size)


def open_exported(
    repo: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
) -> Scorer:
    """The parts of the export at `repo`, loaded and checked here, as a `Scorer` (`score_exported`).

    `device`: cpu, or cuda[:N]; `threads`: intra-op threads (None: the runtime's own). Needs the `serve`
    extra; raises `NotFoundError` where there is no export or an artifact is missing, `ManifestError` where
    the manifest lacks a part or an artifact is not the file exported.
    """
    _require(("torch", "onnxruntime"), "serve", "an export's parts in this process")
    try:
        runners = load_exported(Path(repo), device, threads)
    except D3QEServeError:
        raise
    except FileNotFoundError as e:  # no export there, or an artifact missing
        raise NotFoundError(str(e)) from e
    except KeyError as e:  # a part the manifest does not hold
        raise ManifestError(e.args[0]) from e
    return lambda items: score_exported(runners, items, threshold, batch_size)
