"""The model in this process: the options that choose its weights, building it, and scoring with it.

`EAGER` is the in-process runtime the CLI hands to `d3qe score` and `d3qe eval` (`--runtime eager`);
`d3qe export`, `d3qe demo` and the benchmarks build their detector with `detector_from_args`. Torch and
the model are imported only when a detector is built, so that adding these options costs no start-up time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from client.results import DEFAULT_THRESHOLD, InProcessRuntime, Item, Scorer, ScoreResult

if TYPE_CHECKING:
    import torch

    from d3qe import D3QE


def add_weight_arguments(p: argparse.ArgumentParser, role: str = "") -> None:
    """--checkpoint, --vq-checkpoint, --preset, --seed, --freq-bias; `role` prefixes their help ("eager: ")."""
    p.add_argument(
        "--checkpoint",
        help=f"{role}the authors' D³QE .pth, or our .safetensors inference weights "
        "(default: seeded random weights, whose scores mean nothing)",
    )
    p.add_argument("--vq-checkpoint", help=f"{role}LlamaGen's vq_ds16_c2i.pt (replaces the checkpoint's tokenizer)")
    # Checked by load_detector (d3qe.PRESETS, d3qe.config.FREQ_BIAS_MODES): argparse choices would import torch.
    p.add_argument("--preset", default="full", help=f"{role}architecture of seeded weights: full or tiny")
    p.add_argument("--seed", type=int, default=0, help=f"{role}seed of the random weights without a checkpoint")
    p.add_argument(
        "--freq-bias",
        default="reference",
        help=f"{role}reference: upstream's published behaviour (zero frequency bias); stats: the saved counts",
    )


def detector_from_args(args: argparse.Namespace) -> D3QE:
    from d3qe import load_detector

    return load_detector(
        args.checkpoint, args.vq_checkpoint, preset=args.preset, freq_bias=args.freq_bias, seed=args.seed
    )


def score_eager(
    model: torch.nn.Module, items: Iterable[Item], threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8
) -> Iterator[ScoreResult]:
    """Preprocess and score (source, bytes or path) pairs in batches; an image that fails to load is reported
    and its batch goes on."""
    import torch

    from d3qe import ImageError, preprocess

    def run(batch: list[tuple[str, torch.Tensor]]) -> Iterator[ScoreResult]:
        with torch.inference_mode():
            logits = model(torch.stack([t for _, t in batch])).squeeze(1).tolist()
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
