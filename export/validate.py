"""Every artifact against the eager model, as soon as it is written, with a stated tolerance.

The inputs are fixed: the images given (preprocessed as the server does) and seeded synthetic
pixels up to `POOL` images; each part runs at batch 1, 3 and 8 (first images of the pool) on the
eager model's own upstream tensors, so one part's error is measured alone. The whole chain of
artifacts is then run once more end to end, which is the error a user of the ensemble sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d3qe import preprocess
from export.parts import PartSpec

POOL = 8
BATCHES = (1, 3, 8)
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    """Largest max |Δ| allowed per float output, and the smallest share of equal code indices."""

    max_abs: dict[str, float]
    min_index_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def _reduced(residual: float, clip_feat: float, logit: float, min_index_agreement: float) -> Tolerance:
    # |Δ sigmoid| <= |Δ logit| / 4, so PROB's bound follows from LOGIT's.
    return Tolerance(
        {"RESIDUAL": residual, "CLIP_FEAT": clip_feat, "LOGIT": logit, "PROB": logit / 4}, min_index_agreement
    )


# fp32: the fixture's 1e-4 on logits (tests/fixtures/REFERENCE.md) applied to every float output,
# and every code index equal. Never widened: each reduced precision has its own row, set at about
# 2.5x the worst error measured on the tiny fixture (its images) and the full-size seeded model
# (export/README.md lists the measurements). Where a reduced-precision encoder flips a code index,
# that token's residual moves to another code: at most 2 apart on the unit sphere, hence RESIDUAL 2.
TOLERANCES = {
    "fp32": Tolerance({"RESIDUAL": 1e-4, "CLIP_FEAT": 1e-4, "LOGIT": 1e-4, "PROB": 1e-4}, 1.0),
    "int8": _reduced(1e-4, 0.4, 0.08, 1.0),  # CLIP only: the VQ encoder and the head stay fp32
    "fp16": _reduced(2.0, 0.015, 0.05, 0.97),
    "bf16": _reduced(2.0, 0.1, 0.2, 0.85),
}


class ValidationError(RuntimeError):
    """An exported artifact disagrees with the eager model beyond its precision's tolerance."""


def synthetic_pixels(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] with fine noise on top: neither flat nor white noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, 8, 8, generator=gen), size=(size, size), mode="bicubic")
    return (coarse + 0.1 * torch.randn(count, 3, size, size, generator=gen)).clamp(0, 1)


def validation_pixels(images: Sequence[Path], size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The fixed validation pool of `POOL` images: `images` first, then seeded synthetic ones; and their names."""
    if len(images) > POOL:
        raise ValueError(f"at most {POOL} validation images, got {len(images)}")
    real = [preprocess(p) for p in images]
    synthetic = synthetic_pixels(POOL - len(real), size, seed)
    names = [Path(p).name for p in images] + [f"synthetic-{seed}-{i}" for i in range(len(synthetic))]
    return torch.cat([torch.stack(real), synthetic]) if real else synthetic, names


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], exact: Iterable[str]) -> dict[str, dict]:
    """Per output: max |Δ| (and the reference's max |value|, for scale), or index agreement for exact ones."""
    exact = set(exact)
    result = {}
    for name, ref in want.items():
        out = got[name]
        if out.shape != ref.shape:
            result[name] = {"error": f"shape {list(out.shape)}, expected {list(ref.shape)}"}
        elif name in exact:
            equal = out == ref
            result[name] = {"agreement": float(equal.mean()), "mismatches": int(equal.size - equal.sum())}
        else:
            delta = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            result[name] = {"max_abs": float(delta.max()), "ref_max_abs": float(np.abs(ref).max())}
    return result


def worst(results: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """The worst of several `compare` results, output by output."""
    merged: dict[str, dict] = {}
    for result in results:
        for name, r in result.items():
            m = merged.setdefault(name, dict(r))
            if "error" in r:
                m["error"] = r["error"]
            elif "agreement" in r:
                m["agreement"] = min(m["agreement"], r["agreement"])
                m["mismatches"] = max(m["mismatches"], r["mismatches"])
            else:
                m["max_abs"] = max(m["max_abs"], r["max_abs"])
                m["ref_max_abs"] = max(m["ref_max_abs"], r["ref_max_abs"])
    return merged


def problems(measured: dict[str, dict], tolerance: Tolerance) -> list[str]:
    found = []
    for name, r in measured.items():
        if "error" in r:
            found.append(f"{name}: {r['error']}")
        elif "agreement" in r and r["agreement"] < tolerance.min_index_agreement:
            found.append(
                f"{name}: {r['agreement']:.2%} of indices agree ({r['mismatches']} differ), "
                f"tolerance {tolerance.min_index_agreement:.2%}"
            )
        elif "max_abs" in r and not r["max_abs"] <= tolerance.max_abs[name]:  # `not <=` also catches NaN
            found.append(f"{name}: max |Δ| {r['max_abs']:.3g} > tolerance {tolerance.max_abs[name]:.3g}")
    return found


def _numpy(reference: dict[str, torch.Tensor], names: Iterable[str], batch: int) -> dict[str, np.ndarray]:
    return {n: reference[n][:batch].numpy() for n in names}


def validate_part(
    runner: Runner, spec: PartSpec, reference: dict[str, torch.Tensor], tolerance: Tolerance, max_batch: int
) -> dict:
    """Run the artifact at each validation batch that fits `max_batch`; the record for the manifest."""
    batches = sorted({b for b in BATCHES if b <= max_batch} | ({max_batch} if max_batch < max(BATCHES) else set()))
    per_batch = {}
    for b in batches:
        got = runner(_numpy(reference, spec.input_names, b))
        per_batch[str(b)] = compare(got, _numpy(reference, spec.output_names, b), spec.exact_outputs)
    measured = worst(per_batch.values())
    found = problems(measured, tolerance)
    return {
        "tolerance": tolerance.as_dict(),
        "batches": per_batch,
        "worst": measured,
        "problems": found,
        "passed": not found,
    }


def validate_chain(
    runners: dict[str, Runner],
    specs: dict[str, PartSpec],
    reference: dict[str, torch.Tensor],
    tolerance: Tolerance,
    max_batch: int,
) -> dict:
    """The whole pool through every artifact in turn, as the ensemble runs them; compared with the eager chain."""
    pool = len(reference["PIXELS"])
    chunks = []
    for start in range(0, pool, max_batch):
        tensors = {"PIXELS": reference["PIXELS"][start : start + max_batch].numpy()}
        for name, spec in specs.items():
            tensors.update(runners[name]({n: tensors[n] for n in spec.input_names}))
        chunks.append(tensors)
    got = {n: np.concatenate([c[n] for c in chunks]) for n in ("INDICES", "LOGIT", "PROB")}
    measured = compare(got, _numpy(reference, got, pool), ("INDICES",))
    found = problems(measured, tolerance)
    return {
        "images": pool,
        "logits": got["LOGIT"][:, 0].tolist(),
        "reference_logits": reference["LOGIT"][:, 0].tolist(),
        "measured": measured,
        "problems": found,
        "passed": not found,
    }
