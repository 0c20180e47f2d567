"""Every artifact against the eager model, as soon as it is written, with a stated tolerance.

The inputs are fixed: the images given (preprocessed as the server does), then a spread sample of
the fidelity corpus (`export.corpus`) up to `POOL` images; each part runs at batch 1, 3 and 8 (first
images of the pool) on the eager model's own upstream tensors, so one part's error is measured alone.
The whole chain of artifacts is then run once more end to end, which is the error a user of the
ensemble sees.

Code indices get special care. The VQ encoder picks, per token, the code of highest cosine score; when
the two best codes of a token score within the runtime's rounding error of each other (a near-tie),
another runtime may pick the other one, and that token's residual and the image's logit move with it.
That is not an export bug, and the fidelity benchmark (`d3qe fidelity`) measures how often it happens
and what it does to the logit. So: a flipped token that was not a near-tie fails validation at once;
near-tie flips are counted and held to `min_index_agreement` (a tie flipping one token passes, 5 %
of tokens flipping does not); RESIDUAL is compared on the tokens that did not flip and LOGIT on the
images none of whose tokens flipped, the flipped images' |Δlogit| being reported beside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d3qe_serve.contract import (
    ATTENTION,
    CLIP_FEAT,
    ERROR_MAP,
    FAKE_FREQ,
    INDICES,
    LOGIT,
    PIXELS,
    PROB,
    REAL_FREQ,
    RESIDUAL,
)
from d3qe_serve.d3qe import preprocess
from d3qe_serve.d3qe.parts import PartSpec

POOL = 8
BATCHES = (1, 3, 8)
INDEX_OUTPUTS = (RESIDUAL, INDICES)  # the VQ encoder's: compared token by token, ties accounted for
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    """Largest max |Δ| allowed per float output, and the smallest share of equal code indices. An output named in
    `relative` has its bound as a share of the reference's largest |value| instead: its scale is the weights'
    (a seeded ViT-L/14's CLIP features reach ~4.9, the tiny fixture's another scale), rounding's is relative."""

    max_abs: dict[str, float]
    min_index_agreement: float
    relative: frozenset[str] = frozenset()

    def bound(self, name: str, ref_max_abs: float) -> float:
        """The largest max |Δ| `name` may have where the reference's largest |value| is `ref_max_abs`."""
        return self.max_abs[name] * (ref_max_abs if name in self.relative else 1.0)

    def as_dict(self) -> dict:
        """As the manifest records it (JSON: `relative` a sorted list)."""
        return {**asdict(self), "relative": sorted(self.relative)}


def _reduced(
    residual: float, clip_feat: float, logit: float, min_index_agreement: float, relative: frozenset[str] = frozenset()
) -> Tolerance:
    # |Δ sigmoid| <= |Δ logit| / 4, so PROB's bound follows from LOGIT's.
    bounds = {RESIDUAL: residual, CLIP_FEAT: clip_feat, LOGIT: logit, PROB: logit / 4}
    return Tolerance(bounds, min_index_agreement, relative)


# What each row guards: an export bug (a wrong op, a dropped bias, a broken dynamic axis) flips tokens
# that are not tied, moves unit latents by O(1) or CLIP features by far more than rounding. fp32: every
# flip a near-tie and at least 99 % of code indices equal; CLIP_FEAT 1e-4; RESIDUAL 5e-3 on unflipped
# tokens, because the unit-normalised latent amplifies the encoder's rounding by 1/|z| where |z| is
# small (`d3qe fidelity`, 554 corpus images, full-size seeded model: |Δz| up to 1.7e-3; tiny fixture,
# validation sample: 1.2e-3); LOGIT 1e-2 on images without a flipped token, that error carried through
# D³AT (same run: p99 6.8e-4, max 3.5e-3; the fixture's own images stay within its 1e-4,
# tests/fixtures/REFERENCE.md). A near-tie flip moves its image's logit further (up to 1.8e-2 in that
# run): reported, not held to LOGIT. Each reduced precision has its own row, set at about 2-2.5x the worst
# error measured (docs/export.md lists the measurements).
# The evidence part (fp32 at every precision) is held to rounding: its outputs are shown, not thresholded
# (tiny fixture: ERROR_MAP and the frequencies exact, ATTENTION 5.1e-9).
#
# bf16, what the GPU run's full-size export is held to (issue 24: its first bounds came from the tiny fixture).
# - Indices: torch bf16 on the full-size seeded model (`d3qe fidelity`, 554 corpus images, CPU) kept 93.7 % of
#   codes (per image: p1 84.4 %, worst 67.2 %). On this validation pool it kept 93.8 % (batch 1), 92.7 % (the
#   first 3) and 89.6 % (all 8: the pool's 8th image, synthetic/edge-8, is the corpus' worst): 0.85 holds with
#   4.6 points to spare, against about 0.7 of binomial noise over 2,048 tokens. A GPU's bf16 kernels round
#   differently, not more (fp32 accumulation either way). tests/test_gpu_run.py recomputes this from the
#   committed fidelity.json and fails if the pool changes.
# - CLIP_FEAT, relative to the reference's largest |feature| (scale-free): OpenVINO bf16 on the full-size
#   seeded model moved features by up to 0.066 of 4.88 (1.3 %, 32 corpus images, `d3qe tune`); torch bf16
#   also rounds the weights and the layer norms, at most about twice that (2.7 %): 0.06 is 2.2x that and
#   4.5x the measured, while an export bug (a dropped bias, a wrong op) moves features by their own scale.
#   The absolute 0.1 before it would have refused torch bf16 at anything above 2 % of ViT-L/14's 4.9.
# - RESIDUAL 0.2 on unflipped tokens: the same fidelity run measured bf16 latent errors up to 0.108 (p99 0.037).
# - LOGIT 0.2 (the head alone, on the reference's own inputs; end to end every bf16 image has a flipped token,
#   so the chain's LOGIT is reported, not held): that run's end-to-end |Δlogit| with flips reached 0.17.
EVIDENCE_TOLERANCE = {ERROR_MAP: 1e-5, ATTENTION: 1e-6, REAL_FREQ: 1e-8, FAKE_FREQ: 1e-8}
TOLERANCES = {
    "fp32": Tolerance({RESIDUAL: 5e-3, CLIP_FEAT: 1e-4, LOGIT: 1e-2, PROB: 2.5e-3, **EVIDENCE_TOLERANCE}, 0.99),
    "int8": _reduced(5e-3, 0.4, 0.08, 0.99),  # CLIP only: the VQ encoder and the head stay fp32
    "fp16": _reduced(2e-2, 0.015, 0.05, 0.97),
    "bf16": _reduced(2e-1, 0.06, 0.2, 0.85, relative=frozenset({CLIP_FEAT})),
}


def token_ties(
    residual: np.ndarray,
    indices: np.ndarray,
    ref_residual: np.ndarray,
    ref_indices: np.ndarray,
    codebook: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per token [B, L]: `flipped` (another code than the reference's), `near_tie` (the reference's two best
    codes score closer than twice this runtime's latent error: a flip is possible), `gap` (that score
    difference) and `error` (|Δ| of the unit latent between runtime and reference).

    RESIDUAL is `codebook[index] − z` on the unit sphere (`d3qe.vq`), so each side's latent z is recovered
    from its own outputs; a code's cosine score moves by at most |Δz|, hence the factor 2.
    """
    unit = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)

    def latent(res: np.ndarray, idx: np.ndarray) -> np.ndarray:
        b, d = res.shape[:2]
        return unit[idx] - res.reshape(b, d, -1).transpose(0, 2, 1)

    z_ref, z = latent(ref_residual, ref_indices), latent(residual, indices)
    error = np.linalg.norm(z - z_ref, axis=-1)
    gap = np.empty(ref_indices.shape, dtype=np.float64)
    for i, tokens in enumerate(z_ref):  # one image's scores at a time: [L, codebook size]
        top2 = np.partition(tokens @ unit.T, -2, axis=1)[:, -2:]
        gap[i] = top2[:, 1] - top2[:, 0]
    return {"flipped": indices != ref_indices, "near_tie": gap < 2 * error, "gap": gap, "error": error}


def synthetic_pixels(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] with fine noise on top: neither flat nor white noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, 8, 8, generator=gen), size=(size, size), mode="bicubic")
    return (coarse + 0.1 * torch.randn(count, 3, size, size, generator=gen)).clamp(0, 1)


def validation_pixels(images: Sequence[Path]) -> tuple[torch.Tensor, list[str]]:
    """The fixed validation pool of `POOL` images: `images` first, then a spread sample of the fidelity corpus."""
    from d3qe_serve.export.corpus import corpus

    if len(images) > POOL:
        raise ValueError(f"at most {POOL} validation images, got {len(images)}")
    sample = corpus(POOL - len(images)) if len(images) < POOL else []
    pixels = [preprocess(p) for p in images] + [preprocess(item.data) for item in sample]
    return torch.stack(pixels), [Path(p).name for p in images] + [f"corpus:{item.name}" for item in sample]


def compare(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    exact: Iterable[str],
    ties: dict[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per output: max |Δ| (and the reference's max |value|, for scale), or index agreement for exact ones.

    With `ties` (`token_ties` of these outputs), INDICES also counts near-ties and flips outside them,
    RESIDUAL is compared on unflipped tokens only, and LOGIT/PROB on images without a flipped token,
    the others' max |Δ| reported as `max_abs_flipped_images`.
    """
    exact = set(exact)
    flipped_tokens = ties["flipped"] if ties is not None else None
    flipped_images = flipped_tokens.any(axis=1) if flipped_tokens is not None else None
    result = {}
    for name, ref in want.items():
        out = got[name]
        if out.shape != ref.shape:
            result[name] = {"error": f"shape {list(out.shape)}, expected {list(ref.shape)}"}
            continue
        if name in exact:
            equal = out == ref
            result[name] = {"agreement": float(equal.mean()), "mismatches": int(equal.size - equal.sum())}
            if ties is not None:
                result[name]["near_ties"] = int(ties["near_tie"].sum())
                result[name]["flips_outside_ties"] = int((ties["flipped"] & ~ties["near_tie"]).sum())
            continue
        delta = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        if ties is not None and name == RESIDUAL:
            b, d = delta.shape[:2]
            delta = delta.reshape(b, d, -1).transpose(0, 2, 1)[~flipped_tokens]
        elif flipped_images is not None and len(delta) == len(flipped_images) and flipped_images.any():
            result[name] = {"max_abs_flipped_images": float(delta[flipped_images].max())}
            delta = delta[~flipped_images]
        result[name] = {
            **result.get(name, {}),
            "max_abs": float(delta.max()) if delta.size else 0.0,
            "ref_max_abs": float(np.abs(ref).max()),
        }
    return result


def worst(results: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """The worst of several `compare` results, output by output."""
    merged: dict[str, dict] = {}
    for result in results:
        for name, r in result.items():
            m = merged.setdefault(name, dict(r))
            if "error" in r:
                m["error"] = r["error"]
            else:
                for key, value in r.items():  # the worst of each: least agreement, most of every count and |Δ|
                    m[key] = min(m[key], value) if key == "agreement" else max(m.get(key, value), value)
    return merged


def problems(measured: dict[str, dict], tolerance: Tolerance) -> list[str]:
    found = []
    for name, r in measured.items():
        if "error" in r:
            found.append(f"{name}: {r['error']}")
        elif r.get("flips_outside_ties"):
            found.append(f"{name}: {r['flips_outside_ties']} indices differ where the two best codes are not tied")
        elif "agreement" in r and r["agreement"] < tolerance.min_index_agreement:
            found.append(
                f"{name}: {r['agreement']:.2%} of indices agree ({r['mismatches']} differ), "
                f"tolerance {tolerance.min_index_agreement:.2%}"
            )
        elif "max_abs" in r and not r["max_abs"] <= (bound := tolerance.bound(name, r["ref_max_abs"])):  # NaN too
            of = f" ({tolerance.max_abs[name]:g} of the reference's max |value| {r['ref_max_abs']:.3g})"
            scale = of if name in tolerance.relative else ""
            found.append(f"{name}: max |Δ| {r['max_abs']:.3g} > tolerance {bound:.3g}{scale}")
    return found


def _numpy(reference: dict[str, torch.Tensor], names: Iterable[str], batch: int) -> dict[str, np.ndarray]:
    return {n: reference[n][:batch].numpy() for n in names}


def _ties(got: dict[str, np.ndarray], want: dict[str, np.ndarray], codebook: np.ndarray) -> dict | None:
    if not set(INDEX_OUTPUTS) <= got.keys() or any(got[n].shape != want[n].shape for n in INDEX_OUTPUTS):
        return None
    return token_ties(got[RESIDUAL], got[INDICES], want[RESIDUAL], want[INDICES], codebook)


def validate_part(
    runner: Runner,
    spec: PartSpec,
    reference: dict[str, torch.Tensor],
    tolerance: Tolerance,
    max_batch: int,
    codebook: np.ndarray,
) -> dict:
    """Run the artifact at each validation batch that fits `max_batch`; the record for the manifest.

    `codebook`: the VQ codebook [size, dim], to tell near-tie flips of the code indices from errors.
    """
    batches = sorted({b for b in BATCHES if b <= max_batch} | ({max_batch} if max_batch < max(BATCHES) else set()))
    per_batch = {}
    for b in batches:
        got = runner(_numpy(reference, spec.input_names, b))
        want = _numpy(reference, spec.output_names, b)
        per_batch[str(b)] = compare(got, want, spec.exact_outputs, _ties(got, want, codebook))
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
    codebook: np.ndarray,
) -> dict:
    """The whole pool through every artifact in turn, as the ensemble runs them; compared with the eager chain."""
    pool = len(reference[PIXELS])
    chunks = []
    for start in range(0, pool, max_batch):
        tensors = {PIXELS: reference[PIXELS][start : start + max_batch].numpy()}
        for name, spec in specs.items():
            tensors.update(runners[name]({n: tensors[n] for n in spec.input_names}))
        chunks.append(tensors)
    got = {n: np.concatenate([c[n] for c in chunks]) for n in (RESIDUAL, INDICES, LOGIT, PROB)}
    want = _numpy(reference, got, pool)
    measured = compare(got, want, (INDICES,), _ties(got, want, codebook))
    found = problems(measured, tolerance)
    return {
        "images": pool,
        "logits": got[LOGIT][:, 0].tolist(),
        "reference_logits": reference[LOGIT][:, 0].tolist(),
        "measured": measured,
        "problems": found,
        "passed": not found,
    }
