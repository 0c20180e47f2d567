"""What a configuration of the parts does to the scores, against the eager fp32 reference on the same images.

The measures `d3qe fidelity` (benchmarks/fidelity.py) reports per configuration and `d3qe tune` (export/tune.py)
per candidate: |Δlogit| quantiles and verdict agreement; with the VQ encoder's outputs, token agreement, near-ties
and flips outside them (`export.validate.token_ties`), and the unit latent's |Δ|.
"""

from __future__ import annotations

import numpy as np

from d3qe_serve.client.results import DEFAULT_THRESHOLD
from d3qe_serve.contract import INDICES, LOGIT, RESIDUAL


def quantiles(values: np.ndarray) -> dict[str, float | None]:
    """p50, p99 and max of `values` (None for each when empty)."""
    if not values.size:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": float(np.quantile(values, 0.5)),
        "p99": float(np.quantile(values, 0.99)),
        "max": float(values.max()),
    }


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def summarize(
    name: str, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], codebook: np.ndarray | None
) -> dict:
    """The fidelity of one configuration's LOGIT (and, given `codebook` and its RESIDUAL and INDICES, its code
    indices) against the reference's, as a row: per-image |Δlogit| and flips included (`per_image_*`)."""
    from d3qe_serve.export.validate import INDEX_OUTPUTS, token_ties  # torch: only when measuring

    ref_logit, logit = reference[LOGIT].reshape(-1), got[LOGIT].reshape(-1)
    ok = np.isfinite(logit)
    dlogit = np.abs(logit.astype(np.float64) - ref_logit)
    verdict_ref, verdict = ref_logit > _logit(DEFAULT_THRESHOLD), logit > _logit(DEFAULT_THRESHOLD)
    row = {
        "config": name,
        "images": len(ref_logit),
        "failed": int((~ok).sum()),
        "dlogit": quantiles(dlogit[ok]),
        "verdict_agreement": float((verdict_ref == verdict)[ok].mean()),
        "per_image_dlogit": [float(d) for d in dlogit],
    }
    if codebook is None or not set(INDEX_OUTPUTS) <= got.keys():
        return row
    ties = token_ties(got[RESIDUAL], got[INDICES], reference[RESIDUAL], reference[INDICES], codebook)
    flipped_images = ties["flipped"].any(axis=1)
    row.update(
        token_agreement=float(1 - ties["flipped"].mean()),
        images_all_tokens_equal=float(1 - flipped_images.mean()),
        near_tie_rate=float(ties["near_tie"].mean()),
        flipped_tokens=int(ties["flipped"].sum()),
        flips_outside_ties=int((ties["flipped"] & ~ties["near_tie"]).sum()),
        dlogit_images_with_flips=quantiles(dlogit[flipped_images & ok]),
        dlogit_images_without_flips=quantiles(dlogit[~flipped_images & ok]),
        latent_error=quantiles(ties["error"].reshape(-1)),
        per_image_flips=[int(n) for n in ties["flipped"].sum(axis=1)],
    )
    return row
