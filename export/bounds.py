"""Named fidelity bounds `d3qe tune` holds each candidate part to, against eager fp32 on a corpus slice.

One `Bounds` per name, declared once in `BOUNDS`. What each part is held to depends on what it outputs:

- code indices (the VQ encoder): no flip outside a near-tie (`export.validate.token_ties`: a flip where the
  reference's two best codes were not tied is a bug, never rounding) and at least `min_code_agreement` of
  tokens equal. The codes are the detector's signal: every name holds them to fp32 parity.
- CLIP features: cosine to the reference's features at least `cosine_typical` on at least `typical_share`
  of the images, and at least `cosine_floor` on every one.
- the logit (the head, fed the reference's own upstream tensors): max |Δlogit| at most `head_max_dlogit`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from d3qe_serve.contract import CLIP_FEAT, INDICES, LOGIT
from d3qe_serve.export.validate import TOLERANCES

# What the fp32 export promises today (export/validate.py): every flip a near-tie; the head's LOGIT within
# the fp32 tolerance.
FP32_HEAD_DLOGIT = TOLERANCES["fp32"].max_abs[LOGIT]


@dataclass(frozen=True)
class Bounds:
    """A named set of fidelity bounds (see the module's docstring for what each field holds)."""

    name: str
    description: str
    min_code_agreement: float
    cosine_typical: float
    typical_share: float
    cosine_floor: float
    head_max_dlogit: float = FP32_HEAD_DLOGIT

    def as_dict(self) -> dict:
        return asdict(self)

    def violations(self, outputs: list[str], fidelity: dict) -> list[str]:
        """Where a part with `outputs`, measured as `fidelity` (`export.tune.part_fidelity`), leaves these
        bounds; empty when it holds them."""
        found = []
        if INDICES in outputs:
            codes = fidelity["codes"]
            if codes["flips_outside_ties"]:
                found.append(f"{codes['flips_outside_ties']} code flips outside near-ties")
            if not codes["agreement"] >= self.min_code_agreement:
                found.append(f"codes {codes['agreement']:.3%} equal < {self.min_code_agreement:.3%}")
        if CLIP_FEAT in outputs:
            cosine = fidelity["cosine"]
            share = sum(c >= self.cosine_typical for c in cosine["per_image"]) / len(cosine["per_image"])
            if not share >= self.typical_share:
                found.append(f"cosine ≥ {self.cosine_typical:g} on {share:.1%} of images < {self.typical_share:.0%}")
            if not cosine["min"] >= self.cosine_floor:
                found.append(f"cosine min {cosine['min']:.6f} < {self.cosine_floor:g}")
        if LOGIT in outputs and INDICES not in outputs and CLIP_FEAT not in outputs:
            worst = fidelity["end_to_end"]["dlogit"]["max"]
            if not worst <= self.head_max_dlogit:
                found.append(f"|Δlogit| max {worst:.3g} > {self.head_max_dlogit:g}")
        return found


# The VQ bounds are fp32 parity in every name: near-tie flips only, 99.9 % of codes equal (ONNX Runtime fp32
# keeps 99.98 % on the corpus, OpenVINO bf16 91 %, int8 33-55 %: issue 22).
VQ_PARITY = 0.999
BOUNDS = {
    b.name: b
    for b in (
        Bounds(
            "exact",
            "fp32 parity, today's promise: every VQ flip a near-tie, codes ≥ 99.9 % equal, CLIP cosine ≥ 0.99999",
            min_code_agreement=VQ_PARITY,
            cosine_typical=0.99999,
            typical_share=1.0,
            cosine_floor=0.99999,
        ),
        Bounds(
            "default",
            "VQ as exact; CLIP cosine ≥ 0.999 on ≥ 99 % of corpus images and ≥ 0.995 on every one",
            min_code_agreement=VQ_PARITY,
            cosine_typical=0.999,
            typical_share=0.99,
            cosine_floor=0.995,
        ),
        Bounds(
            "fast",
            "VQ as exact; CLIP cosine ≥ 0.995 on ≥ 99 % of corpus images and ≥ 0.99 on every one",
            min_code_agreement=VQ_PARITY,
            cosine_typical=0.995,
            typical_share=0.99,
            cosine_floor=0.99,
        ),
    )
}
