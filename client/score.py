"""`d3qe score`: score image files with the eager model in-process or through the Triton server."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from client.results import DEFAULT_THRESHOLD, ScoreResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given (whatever their suffix: a bad one gets its own error); folders recursively, images only."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


def score_eager(
    model: torch.nn.Module, paths: Iterable[Path], threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8
) -> Iterator[ScoreResult]:
    """Preprocess and score in batches; an image that fails to load is reported and its batch goes on."""
    from d3qe import ImageError, preprocess

    def run(batch: list[tuple[Path, torch.Tensor]]) -> Iterator[ScoreResult]:
        with torch.inference_mode():
            logits = model(torch.stack([t for _, t in batch])).squeeze(1).tolist()
        for (path, _), logit in zip(batch, logits, strict=True):
            yield ScoreResult.from_logit(str(path), logit, threshold)

    batch: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            batch.append((path, preprocess(path)))
        except ImageError as e:
            yield ScoreResult.failed(str(path), str(e))
            continue
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def write_results(results: Iterable[ScoreResult], fmt: str, out=sys.stdout) -> int:
    """Print one row per image; returns the number of failed images."""
    failed = 0
    writer = None
    for r in results:
        failed += not r.ok
        if fmt == "json":
            print(json.dumps(r.as_dict()), file=out, flush=True)
        elif fmt == "csv":
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(r.as_dict()))
                writer.writeheader()
            writer.writerow(r.as_dict())
        elif r.ok:
            print(f"{r.source}\tlogit={r.logit:+.4f}\tp={r.probability:.4f}\t{r.verdict}", file=out, flush=True)
        else:
            print(f"{r.source}\tERROR: {r.error}", file=out, flush=True)
    return failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--runtime", choices=["eager"], default="eager", help="where the model runs")
    p.add_argument("--checkpoint", help="the authors' D³QE .pth, or our .safetensors inference weights")
    p.add_argument("--vq-checkpoint", help="LlamaGen's vq_ds16_c2i.pt (replaces the checkpoint's tokenizer)")
    p.add_argument("--preset", default="full", help="architecture for seeded weights when no checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freq-bias", choices=["reference", "stats"], default="reference")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="P(generated) for the verdict")
    p.add_argument("--batch-size", type=int, default=8)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="one JSON object per line")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv")
    p.set_defaults(fmt="text")


def run(args: argparse.Namespace) -> int:
    from d3qe import load_detector

    model = load_detector(
        args.checkpoint, args.vq_checkpoint, preset=args.preset, freq_bias=args.freq_bias, seed=args.seed
    )
    results = score_eager(model, expand_paths(args.paths), args.threshold, args.batch_size)
    return 1 if write_results(results, args.fmt) else 0
