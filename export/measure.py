"""What `d3qe tune` measures of a part's runner, against the eager fp32 model on a corpus slice.

Fidelity: the part fed the reference's own upstream tensors (`part_fidelity`), then swapped into the eager fp32
chain (`EagerHead` scores a VQ or CLIP candidate's outputs with the reference's others); and the written
repository's whole chain (`chain_fidelity`). Speed: images/s of the part alone per batch size (`measure_speed`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from d3qe_serve.contract import CLIP_FEAT, INDICES, LOGIT, PIXELS, RESIDUAL
from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import PART_NAMES, PartSpec, eager_tensors, part_specs
from d3qe_serve.export.fidelity import quantiles, summarize
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.runtimes import PartRunner, load_part


def batched(
    fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: dict[str, np.ndarray], batch: int
) -> dict[str, np.ndarray]:
    """`fn` over `feeds` `batch` images at a time, the outputs concatenated."""
    n = len(next(iter(feeds.values())))
    chunks = [fn({k: v[s : s + batch] for k, v in feeds.items()}) for s in range(0, n, batch)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def reference_tensors(model: D3QE, pixels: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Every tensor of the ensemble computed by the eager fp32 model (`d3qe.parts.eager_tensors`), as numpy."""

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in eager_tensors(model, torch.from_numpy(feeds[PIXELS])).items()}

    return batched(run, {PIXELS: pixels}, batch)


class EagerHead:
    """The eager fp32 head: what a VQ or CLIP candidate's outputs are scored through (the fp32 chain)."""

    def __init__(self, model: D3QE, spec: PartSpec, batch: int) -> None:
        self.module, self.spec, self.batch = spec.module(model), spec, batch

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def run(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                outs = self.module(*(torch.from_numpy(chunk[n]) for n in self.spec.input_names))
            return {n: t.numpy() for n, t in zip(self.spec.output_names, outs, strict=True)}

        return batched(run, {n: feeds[n] for n in self.spec.input_names}, self.batch)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def part_fidelity(
    spec: PartSpec,
    got: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    head: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    codebook: np.ndarray,
) -> dict:
    """A candidate's outputs `got` (the part fed `reference`'s upstream tensors) against eager fp32: its own
    measures (`codes` for code indices, `cosine` and `feature_abs` for CLIP features) and `end_to_end`, the
    candidate swapped into the eager fp32 chain (`head` scores its outputs with the reference's others)."""
    record: dict = {"images": len(reference[PIXELS])}
    chain = {**reference, **got}
    if LOGIT not in got:
        chain.update(head(chain))
    row = summarize(spec.name, reference, chain, codebook if INDICES in got else None)
    if INDICES in got:
        codes = ("images_all_tokens_equal", "near_tie_rate", "flipped_tokens", "flips_outside_ties", "latent_error")
        record["codes"] = {"agreement": row["token_agreement"], **{k: row[k] for k in codes}}
    if CLIP_FEAT in got:
        cosine = _cosines(got[CLIP_FEAT], reference[CLIP_FEAT])
        delta = np.abs(got[CLIP_FEAT].astype(np.float64) - reference[CLIP_FEAT]).max(axis=1)
        record["cosine"] = {
            "min": float(cosine.min()),
            "p1": float(np.quantile(cosine, 0.01)),
            "p50": float(np.quantile(cosine, 0.5)),
            "per_image": [float(c) for c in cosine],
        }
        record["feature_abs"] = {**quantiles(delta), "reference_max": float(np.abs(reference[CLIP_FEAT]).max())}
    keep = ("dlogit", "verdict_agreement", "failed", "dlogit_images_with_flips", "dlogit_images_without_flips")
    record["end_to_end"] = {k: row[k] for k in keep if k in row}
    return record


def speed_feeds(spec: PartSpec, reference: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The part's inputs at `batch`: the first images of the slice, repeated if it has fewer."""
    n = len(reference[PIXELS])
    rows = np.arange(batch) % n
    return {name: np.ascontiguousarray(reference[name][rows]) for name in spec.input_names}


def measure_speed(
    runners: Mapping[str, PartRunner],
    feeds: Mapping[int, dict[str, np.ndarray]],
    *,
    rounds: int,
    runs: int,
    desc: str = "speed",
) -> dict[str, dict]:
    """images/s of each runner at each batch of `feeds`: the median of `rounds` rounds of `runs` calls, the
    runners interleaved within a round; `score`, the geometric mean over the batches."""
    for runner in runners.values():  # warm-up: each shape once (OpenVINO and ONNX Runtime plan per shape)
        for batch_feeds in feeds.values():
            runner(batch_feeds)
    per_round: dict[tuple[str, int], list[float]] = {(k, b): [] for k in runners for b in feeds}
    with tqdm(total=rounds * len(runners) * len(feeds), desc=desc, unit="timing", leave=False) as bar:
        for _ in range(rounds):
            for key, runner in runners.items():
                for batch, batch_feeds in feeds.items():
                    start = time.perf_counter()
                    for _ in range(runs):
                        runner(batch_feeds)
                    per_round[key, batch].append(runs * batch / (time.perf_counter() - start))
                    bar.update()
    speeds = {}
    for key in runners:
        by_batch = {
            str(b): {"images_per_s": statistics.median(per_round[key, b]), "rounds": per_round[key, b]} for b in feeds
        }
        score = math.prod(v["images_per_s"] for v in by_batch.values()) ** (1 / len(by_batch))
        speeds[key] = {"batches": by_batch, "score": score}
    return speeds


def chain_fidelity(repo: Path, reference: dict[str, np.ndarray], codebook: np.ndarray, device: str, batch: int) -> dict:
    """The written repository's scoring parts chained in-process over the slice, against eager fp32."""
    specs = part_specs(Manifest.read(repo).d3qe_config())
    tensors = {PIXELS: reference[PIXELS]}
    for part in PART_NAMES:
        runner = load_part(repo, part, device)
        tensors.update(batched(runner, {n: tensors[n] for n in specs[part].input_names}, batch))
    row = summarize("tuned", reference, {n: tensors[n] for n in (RESIDUAL, INDICES, LOGIT)}, codebook)
    return {k: v for k, v in row.items() if k != "config" and not k.startswith("per_image")}
