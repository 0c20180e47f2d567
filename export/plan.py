"""What each part is built as: a runtime and a precision (`PartChoice`), and the names of both.

A precision names how a part computes, including which int8:
- "fp32", "fp16", "bf16": every operation in that type (OpenVINO is told so explicitly: it would pick
  bf16 by itself for fp32 on CPUs with AVX512-BF16 or AMX);
- "int8": static int8, calibrated on corpus images held apart (`export.calibration`), the rest fp32
  (ONNX Runtime: QDQ from `quantize_static`; OpenVINO: NNCF's, as OpenVINO IR; `export.quantize`);
- "int8-bf16": static int8 as above, the rest bf16 (OpenVINO only);
- "int8-dynamic": ONNX Runtime's dynamic int8 (no calibration), what `--precision int8` has always built.

A manifest records the family in `PartEntry.precision` ("int8" for all three int8s, so exports made
before static int8 read as they were) and which int8 in `PartEntry.quantization` ("static"/"dynamic").
"""

from __future__ import annotations

from dataclasses import dataclass

from d3qe_serve.d3qe.parts import PartSpec

RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-bf16", "int8-dynamic")
# What `d3qe export --precision` offers: a uniform precision, each part built as `uniform_choice` says.
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
STATIC_INT8 = ("int8", "int8-bf16")


@dataclass(frozen=True)
class PartChoice:
    """One part's runtime and precision (a name of `RUNTIMES` and of `PRECISIONS`)."""

    runtime: str
    precision: str

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; one of {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; one of {', '.join(PRECISIONS)}")

    @property
    def family(self) -> str:
        """The precision as the manifest and the tolerances name it: fp32, fp16, bf16 or int8."""
        return "int8" if self.precision.startswith("int8") else self.precision

    @property
    def quantization(self) -> str | None:
        """Which int8: "static" (calibrated), "dynamic", or None (not int8)."""
        if self.precision == "int8-dynamic":
            return "dynamic"
        return "static" if self.precision in STATIC_INT8 else None

    @property
    def calibrated(self) -> bool:
        """Whether building it needs a calibration set."""
        return self.quantization == "static"

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"


def uniform_precision(runtime: str, precision: str) -> str:
    """What `--precision` (one of `EXPORT_PRECISIONS`) means on `runtime`: int8 is ONNX Runtime's dynamic int8
    on onnxruntime (as it has always been), static calibrated int8 elsewhere."""
    return "int8-dynamic" if precision == "int8" and runtime == "onnxruntime" else precision


def uniform_choice(spec: PartSpec, runtime: str, precision: str) -> PartChoice:
    """What `d3qe export --runtime R --precision P` builds `spec`'s part as.

    int8 only where the part declares it (`PartSpec.int8_scopes`; the rest stays fp32), and fp32 for a part
    declared `fp32_only`. --precision int8 means ONNX Runtime's dynamic int8 on onnxruntime (as always),
    static calibrated int8 on OpenVINO (which has no dynamic int8).
    """
    if spec.fp32_only or (precision == "int8" and not spec.int8_scopes):
        return PartChoice(runtime, "fp32")
    return PartChoice(runtime, uniform_precision(runtime, precision))
