"""The wire contract, declared once: the tensors, the parts that pass them on, and the entrances clients call.

Every tier reads it, so it imports no torch and nothing else of this package: the model's parts
(`d3qe.parts`) take and give these tensors, the export records them in `manifest.json`, the repository
writer (`serving.repository`) builds every Triton config from them, and the clients send and read them.

A tensor is a `TensorSpec` (name, numpy dtype name, shape with -1 where a dimension is dynamic; axis 0
is the batch axis). Names and dtypes are fixed; the shapes that follow the architecture's sizes (`Sizes`)
are built for given sizes (`tensors`, `parts`, `entrances`). An entrance is the admission gate clients
call: one input, the scores (with the reviewer's evidence for `d3qe_evidence`) as outputs, and what produced
them (`PROVENANCE`: the export's manifest id and the verdict's threshold), which the gate adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

DYNAMIC = -1  # a dimension of any size; axis 0, the batch axis, always is

# The tensors.
IMAGE = "IMAGE"  # encoded image files, one per row
RGB = "RGB"  # decoded uint8 pixels [H, W, 3], one size per request
PIXELS = "PIXELS"  # the model's input: upstream's eval transform, values in [0, 1]
RESIDUAL = "RESIDUAL"  # the VQ encoder's quantization residual per token
INDICES = "INDICES"  # each token's code
CLIP_FEAT = "CLIP_FEAT"  # CLIP's image feature
LOGIT = "LOGIT"  # the detector's logit: > 0 leans generated
PROB = "PROB"  # sigmoid(LOGIT)
ERROR_MAP = "ERROR_MAP"  # |z_q − z| per token
ATTENTION = "ATTENTION"  # the D³AT attention each token receives
REAL_FREQ = "REAL_FREQ"  # each token's code's share of the real training tokens
FAKE_FREQ = "FAKE_FREQ"  # and of the fake ones
# What produced an answer: every entrance adds them to its ensemble's outputs, one row per item.
MANIFEST_ID = "MANIFEST_ID"  # the id of the export that scored the item (`serving.manifest.Manifest.id`)
THRESHOLD = "THRESHOLD"  # the P(generated) threshold its verdict uses (the export's operating point)
PROVENANCE = (MANIFEST_ID, THRESHOLD)

# The parts, each a served model, in the order the ensembles run them; the evidence part runs only for reviewers.
VQ_ENCODER, CLIP_VISUAL, D3QE_HEAD = "vq_encoder", "clip_visual", "d3qe_head"
PART_NAMES = (VQ_ENCODER, CLIP_VISUAL, D3QE_HEAD)
EVIDENCE = "evidence"

# The entrances, named for what they take.
IMAGE_ENTRANCE = "d3qe"  # encoded image files
RGB_ENTRANCE = "d3qe_rgb"  # decoded pixels of any size (video frames, a trainer's images)
TENSOR_ENTRANCE = "d3qe_tensor"  # the model's input tensors
EVIDENCE_ENTRANCE = "d3qe_evidence"  # encoded image files, scored with the evidence a reviewer reads

SCORES = (LOGIT, PROB)
_PARTS = {  # part: (inputs, outputs)
    VQ_ENCODER: ((PIXELS,), (RESIDUAL, INDICES)),
    CLIP_VISUAL: ((PIXELS,), (CLIP_FEAT,)),
    D3QE_HEAD: ((RESIDUAL, INDICES, CLIP_FEAT), SCORES),
    EVIDENCE: ((RESIDUAL, INDICES), (ERROR_MAP, ATTENTION, REAL_FREQ, FAKE_FREQ)),
}
_ENTRANCES = {  # entrance: (input, outputs): what its ensemble computes, then the provenance its gate adds
    IMAGE_ENTRANCE: (IMAGE, (*SCORES, *PROVENANCE)),
    RGB_ENTRANCE: (RGB, (*SCORES, *PROVENANCE)),
    TENSOR_ENTRANCE: (PIXELS, (*SCORES, *PROVENANCE)),
    EVIDENCE_ENTRANCE: (IMAGE, (*SCORES, INDICES, *_PARTS[EVIDENCE][1], *PROVENANCE)),
}

# numpy's dtype names → Triton's (the KServe v2 protocol's) data types; Triton's BYTES are numpy objects.
TRITON_DTYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "object": "BYTES",
}


def triton_dtype(dtype: np.dtype | type | str) -> str:
    """Triton's name of a numpy dtype, given as a dtype, a scalar type or a name (float32 → FP32, object → BYTES)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{dtype!r} is not a numpy dtype") from e
    if dt.kind == "S":  # fixed-width bytes go over the wire as BYTES too
        return "BYTES"
    if dt.name not in TRITON_DTYPES:
        raise ValueError(f"numpy dtype {dt.name} has no Triton data type")
    return TRITON_DTYPES[dt.name]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name, its numpy dtype's name and its shape (-1: dynamic; axis 0 is the batch axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, tuple | list) else ()  # a list, as JSON holds it, too
        if not shape or any(not isinstance(d, int) or d < DYNAMIC for d in shape):
            raise ValueError(f"{self.name}: shape {list(shape)} must be a batch axis and sizes, -1 where dynamic")
        object.__setattr__(self, "shape", shape)
        try:
            triton_dtype(self.dtype)  # a dtype the wire carries
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    @property
    def dims(self) -> tuple[int, ...]:
        """The shape without the batch axis, as Triton configs state it."""
        return self.shape[1:]

    @property
    def triton_dtype(self) -> str:
        return triton_dtype(self.dtype)

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The concrete shape of `batch` items (for a tensor whose other dimensions are fixed)."""
        if DYNAMIC in self.dims:
            raise ValueError(f"{self.name}: shape {list(self.shape)} has dynamic dimensions besides the batch axis")
        return (batch, *self.dims)

    def renamed(self, name: str) -> TensorSpec:
        return dataclasses.replace(self, name=name)


@dataclass(frozen=True)
class Sizes:
    """The architecture's sizes the tensors' shapes follow (`d3qe.parts.sizes` reads them off a `D3QEConfig`)."""

    image_size: int = 256  # PIXELS' side
    code_dim: int = 8  # RESIDUAL's channels: the VQ codebook's depth
    clip_dim: int = 768  # CLIP_FEAT's width
    downsample: int = 16  # the VQ encoder's: one token per 16 × 16 pixels

    @property
    def grid(self) -> int:
        """Tokens per side."""
        return self.image_size // self.downsample


@dataclass(frozen=True)
class Signature:
    """A served model's interface: its name, the tensors it takes and the tensors it gives."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def input(self) -> TensorSpec:
        """The one input of an entrance."""
        (tensor,) = self.inputs
        return tensor


def tensors(sizes: Sizes = Sizes()) -> dict[str, TensorSpec]:
    """Every tensor of the contract by name, shaped for `sizes`."""
    s, g, d = sizes.image_size, sizes.grid, DYNAMIC
    specs = (
        TensorSpec(IMAGE, "object", (d, 1)),
        TensorSpec(RGB, "uint8", (d, d, d, 3)),
        TensorSpec(PIXELS, "float32", (d, 3, s, s)),
        TensorSpec(RESIDUAL, "float32", (d, sizes.code_dim, g, g)),
        TensorSpec(INDICES, "int64", (d, g * g)),
        TensorSpec(CLIP_FEAT, "float32", (d, sizes.clip_dim)),
        TensorSpec(LOGIT, "float32", (d, 1)),
        TensorSpec(PROB, "float32", (d, 1)),
        TensorSpec(ERROR_MAP, "float32", (d, g, g)),
        TensorSpec(ATTENTION, "float32", (d, g, g)),
        TensorSpec(REAL_FREQ, "float32", (d, g * g)),
        TensorSpec(FAKE_FREQ, "float32", (d, g * g)),
        TensorSpec(MANIFEST_ID, "object", (d, 1)),
        TensorSpec(THRESHOLD, "float32", (d, 1)),
    )
    return {t.name: t for t in specs}


def parts(sizes: Sizes = Sizes()) -> dict[str, Signature]:
    """The parts in the order the ensembles run them (`PART_NAMES`, then the evidence), shaped for `sizes`."""
    t = tensors(sizes)
    return {
        name: Signature(name, tuple(t[n] for n in ins), tuple(t[n] for n in outs))
        for name, (ins, outs) in _PARTS.items()
    }


def entrances(sizes: Sizes = Sizes()) -> dict[str, Signature]:
    """The entrances clients call, shaped for `sizes` (only `d3qe_tensor`'s input and the evidence follow them)."""
    t = tensors(sizes)
    return {name: Signature(name, (t[i],), tuple(t[n] for n in outs)) for name, (i, outs) in _ENTRANCES.items()}


def entrance(name: str) -> Signature:
    """One entrance by name, for clients (its names and dtypes are the same for every architecture)."""
    if name not in _ENTRANCES:
        raise KeyError(f"no entrance {name!r}; the entrances are {', '.join(_ENTRANCES)}")
    return entrances()[name]
