"""The model in this process: the options that choose its weights, building it, and scoring with it.

`EAGER` and `EXPORTED` are the in-process runtimes the CLI hands to `d3qe score` and `d3qe eval`
(`--runtime eager`: the eager model; `--runtime exported --repo DIR`: an export's parts chained here,
as `d3qe bulk`'s actors run them); `d3qe export`, `d3qe demo` and the benchmarks build their detector with
`detector_from_args`. Torch and the model are imported only when a runtime is opened, so that adding
these options costs no start-up time.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from d3qe_serve.client.results import DEFAULT_THRESHOLD, InProcessRuntime, Item, Scorer, ScoreResult

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
    """Preprocess (source, image) pairs and score them `batch_size` at a time with `forward` (pixels → logits);
    an image that fails to load is reported and its batch goes on."""
    import torch

    from d3qe_serve.d3qe import ImageError, preprocess

    def run(batch: list[tuple[str, torch.Tensor]]) -> Iterator[ScoreResult]:
        logits = forward(torch.stack([t for _, t in batch]))
        for (source, _), logit in zip(batch, logits, strict=True):
            yield ScoreResult.from_logit(source, logit, threshold)

    batch: list[tuple[str, torch.Tensor]] = []
    for source, image in items:
        try:
            batch.append((source, preprocess(image)))
        except ImageError as e:
            yield ScoreResult.failed(source, str(e))
            continue
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def score_eager(
    model: torch.nn.Module, items: Iterable[Item], threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8
) -> Iterator[ScoreResult]:
    """Preprocess and score (source, bytes or path) pairs in batches; an image that fails to load is reported
    and its batch goes on."""
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

    tensors = {"PIXELS": pixels}
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
        return run_parts(runners, pixels.numpy())["LOGIT"].reshape(-1).tolist()

    return _score_in_batches(items, forward, threshold, size)


@contextlib.contextmanager
def _open_eager(args: argparse.Namespace) -> Iterator[Scorer]:
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("d3qe: --runtime eager runs the model here: pip install 'd3qe-serve[model]'")
    model = detector_from_args(args)
    yield lambda items: score_eager(model, items, args.threshold, args.batch_size)


EAGER = InProcessRuntime(
    "eager",
    "the eager PyTorch model in this process (needs the [model] extra)",
    lambda p: add_weight_arguments(p, role="eager: "),
    _open_eager,
)


def _add_exported_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, help="exported: the repository `d3qe export` wrote (default: its --out)")
    p.add_argument("--device", default="cpu", help="exported: cpu, or cuda[:N] (ONNX Runtime CUDA provider, TensorRT)")
    p.add_argument("--threads", type=int, help="exported: intra-op threads (default: the runtime's own)")


@contextlib.contextmanager
def _open_exported(args: argparse.Namespace) -> Iterator[Scorer]:
    if any(importlib.util.find_spec(m) is None for m in ("torch", "onnxruntime")):
        raise SystemExit("d3qe: --runtime exported runs the exported parts here: pip install 'd3qe-serve[serve]'")
    from d3qe_serve.serving.manifest import ManifestError
    from d3qe_serve.serving.server import DEFAULT_REPOSITORY

    try:
        runners = load_exported(args.repo or DEFAULT_REPOSITORY, args.device, args.threads)
    except (OSError, KeyError, ManifestError) as e:  # no export there, a part missing, an artifact altered
        raise SystemExit(f"d3qe: --runtime exported: {e}") from e
    yield lambda items: score_exported(runners, items, args.threshold, args.batch_size)


EXPORTED = InProcessRuntime(
    "exported",
    "an exported repository's parts chained in this process (--repo; needs the [serve] extra)",
    _add_exported_arguments,
    _open_exported,
)
