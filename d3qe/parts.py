"""The parts the Triton ensembles run, each declared once (the Optimum way): the three that score
(`PART_NAMES`) and the evidence a reviewer asks for (`EVIDENCE`).

What a part takes and gives is the wire contract's (`d3qe_serve.contract.parts`: names, dtypes, shapes
with -1 for the batch axis); here each part adds the ONNX opset, which outputs must agree exactly (code
indices), how it may be quantised, and the `nn.Module` wrapper that exposes it over a loaded `D3QE`.
Everything else reads these declarations: the export (ONNX, TensorRT, validation, manifests) and the
serving tier (the torch runtime rebuilds a part's module from them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from d3qe_serve import contract
from d3qe_serve.contract import CLIP_VISUAL, D3QE_HEAD, EVIDENCE, INDICES, VQ_ENCODER, Sizes, TensorSpec
from d3qe_serve.contract import PART_NAMES as PART_NAMES  # the parts' names, read here by the export and serving
from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.config import D3QEConfig

BATCH = "batch"  # the name of the symbolic batch axis (axis 0 of every tensor) in the exported graphs
OPSET = 18  # export/onnx_attention.py writes opset-18 onnxscript


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself in fp32; a copy in another dtype, so the loaded model stays as it is."""
    return module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)


class VQEncoder(nn.Module):
    """PIXELS [B, 3, 256, 256] in [0, 1] → RESIDUAL [B, 8, 16, 16], INDICES [B, 256] int64.

    The encoder runs in `dtype`; the nearest-code search over the codebook always runs in fp32.
    """

    def __init__(self, model: D3QE, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.encoder = _in_dtype(model.vq_model.encoder, dtype)
        self.quant_conv = _in_dtype(model.vq_model.quant_conv, dtype)
        self.quantize = model.vq_model.quantize

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.quant_conv(self.encoder(pixels.to(self.dtype)))
        return self.quantize(z.float())


class CLIPVisual(nn.Module):
    """PIXELS [B, 3, 256, 256] in [0, 1] → CLIP_FEAT [B, 768] (224 crop and CLIP normalisation inside)."""

    def __init__(self, model: D3QE, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.clip_model = _in_dtype(model.clip_model, dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip_model(pixels.to(self.dtype)).float()


class D3QEHead(nn.Module):
    """RESIDUAL, INDICES, CLIP_FEAT → LOGIT [B, 1], PROB [B, 1] = sigmoid(LOGIT).

    Holds the detector's head submodules and codebook counts under their D³QE names and runs
    `D3QE.classify` itself, so the frequency lookup (`stats` mode) is inside the exported graph.
    The lookup stays fp32 (the counts sum to more than fp16 holds); the rest runs in `dtype`.
    """

    classify = D3QE.classify
    code_frequencies = D3QE.code_frequencies

    def __init__(self, model: D3QE, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.freq_bias = model.freq_bias
        for name in ("feature_processor", "feature_pooler", "mixed_proj", "clip_proj", "fc"):
            setattr(self, name, _in_dtype(getattr(model, name), dtype))
        self.register_buffer("real_codebook_count", model.real_codebook_count)
        self.register_buffer("fake_codebook_count", model.fake_codebook_count)

    def token_frequency(self, indices: torch.Tensor) -> torch.Tensor:
        return D3QE.token_frequency(self, indices).to(self.dtype)

    def forward(
        self, residual: torch.Tensor, indices: torch.Tensor, clip_feat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.classify(residual.to(self.dtype), indices, clip_feat.to(self.dtype)).float()
        return logit, torch.sigmoid(logit)


class Evidence(nn.Module):
    """RESIDUAL, INDICES → ERROR_MAP, ATTENTION [B, 16, 16], REAL_FREQ, FAKE_FREQ [B, 256] (`D3QE.evidence`).

    Always fp32, whatever the export's precision: it runs only when a reviewer asks, who reads its numbers.
    Shares the head's names (`feature_processor`, the codebook counts) so that the same weights fill it.
    """

    evidence = D3QE.evidence
    code_frequencies = D3QE.code_frequencies
    token_frequency = D3QE.token_frequency

    def __init__(self, model: D3QE, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.freq_bias = model.freq_bias
        self.feature_processor = model.feature_processor
        self.register_buffer("real_codebook_count", model.real_codebook_count)
        self.register_buffer("fake_codebook_count", model.fake_codebook_count)

    def forward(self, residual: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.evidence(residual.float(), indices)


@dataclass(frozen=True)
class PartSpec:
    name: str
    wrapper: type[nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    exact_outputs: tuple[str, ...] = ()  # compared for equality, not closeness
    # Modules whose MatMul/Gemm ONNX Runtime int8-quantises; none: the part stays fp32 at --precision int8.
    int8_scopes: tuple[str, ...] = ()
    fp32_only: bool = False  # exported in fp32 at every precision
    opset: int = OPSET

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def module(self, model: D3QE, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.wrapper(model, dtype).eval()

    def dynamic_shapes(self, max_batch: int) -> tuple[dict[int, torch.export.Dim], ...]:
        """For `torch.onnx.export(dynamo=True)`: axis 0 of every input is one shared batch dimension."""
        batch = torch.export.Dim(BATCH, min=1, max=max_batch)
        return tuple({0: batch} for _ in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {0: BATCH} for t in (*self.inputs, *self.outputs)}

    def random_inputs(self, cfg: D3QEConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs of the declared shapes and dtypes (for tracing; validation uses real pixels)."""
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.concrete_shape(batch)
            if t.dtype == "int64":
                feeds[t.name] = torch.randint(0, cfg.vq.codebook_size, shape, generator=gen)
            else:
                feeds[t.name] = torch.rand(shape, generator=gen)
        return feeds


def sizes(cfg: D3QEConfig) -> Sizes:
    """The sizes the contract's tensor shapes follow, for the architecture `cfg`."""
    return Sizes(image_size=cfg.image_size, code_dim=cfg.vq.codebook_dim, clip_dim=cfg.clip.output_dim)


def part_specs(cfg: D3QEConfig) -> dict[str, PartSpec]:
    """The parts in the order the ensemble runs them, then the evidence: the contract's tensors, shaped for `cfg`."""
    served = contract.parts(sizes(cfg))

    def spec(name: str, wrapper: type[nn.Module], **options) -> PartSpec:
        return PartSpec(name, wrapper, served[name].inputs, served[name].outputs, **options)

    parts = [
        # No int8: its convolutions as static QDQ ran 1.6x faster but changed 40 % of the code indices.
        spec(VQ_ENCODER, VQEncoder, exact_outputs=(INDICES,)),
        spec(CLIP_VISUAL, CLIPVisual, int8_scopes=("clip_model.visual",)),
        # No int8: the head is ~1 % of the time, and int8 added ~0.05 to the fixture's logits.
        spec(D3QE_HEAD, D3QEHead),
        spec(EVIDENCE, Evidence, fp32_only=True),
    ]
    return {p.name: p for p in parts}


def eager_tensors(model: D3QE, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of the ensemble, computed by the eager model: what each part is validated against."""
    with torch.inference_mode():
        residual, indices = model.vq_model(pixels)
        clip_feat = model.clip_model(pixels)
        logit = model.classify(residual, indices, clip_feat)
        error_map, attention, real_freq, fake_freq = model.evidence(residual, indices)
    return {
        contract.PIXELS: pixels,
        contract.RESIDUAL: residual,
        contract.INDICES: indices,
        contract.CLIP_FEAT: clip_feat,
        contract.LOGIT: logit,
        contract.PROB: torch.sigmoid(logit),
        contract.ERROR_MAP: error_map,
        contract.ATTENTION: attention,
        contract.REAL_FREQ: real_freq,
        contract.FAKE_FREQ: fake_freq,
    }
