"""`d3qe::freq_biased_attention`: the math reference, the fused Triton kernel (on CPU under Triton's
interpreter), the op's registrations (opcheck, autograd, compile, export), its two ONNX forms, and the
ahead-of-time compile the TensorRT plugin uses."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import triton
from triton.backends.compiler import GPUTarget

from d3qe_serve.d3qe import attention_kernel
from d3qe_serve.d3qe.attention import check_inputs, freq_biased_attention, freq_biased_attention_math
from d3qe_serve.d3qe.d3at import FreqBiasedBlock
from d3qe_serve.export.onnx_attention import PLUGIN_NAME, PLUGIN_NAMESPACE, translation_table

REPO = Path(__file__).resolve().parents[1]
HEADS, DIM = 8, 64
# Max |error| against float64 math of the same inputs. Measured under the interpreter: fp32 ≤ 3.3e-6 (the
# fp32 math reference: ≤ 3.9e-6); fp16 ≤ 1.04e-3 (fp32 logits and accumulators; the fp16 math reference,
# which rounds its L×L logits to fp16: up to 1.1e-2).
FP32_TOL = 1e-5
FP16_TOL = 2e-3  # about 2 fp16 ulps at |out| ≈ 1
BF16_TOL = 2e-2  # the same in bf16, whose ulp is 8× fp16's


def attention_inputs(
    batch: int,
    len_q: int,
    len_k: int | None = None,
    dims: tuple[int, int, int] = (DIM, DIM, DIM),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    heads: int = HEADS,
) -> tuple[torch.Tensor, ...]:
    """q, k, v, qb, kb of logits std ≈ 2.6 (neither uniform nor one-hot softmax) and an fp32 γ [1]."""
    len_k = len_q if len_k is None else len_k
    gen = torch.Generator().manual_seed(seed)
    d, db, dv = dims
    shapes = [(len_q, d), (len_k, d), (len_k, dv), (len_q, db), (len_k, db)]
    tensors = [torch.randn(batch, heads, n, w, generator=gen).to(dtype) for n, w in shapes]
    return (*tensors, torch.tensor([0.3]))


def d3at_views(
    batch: int, length: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    """q, k, v as D³AT makes them: head-split, transposed views of one Linear output (strided, not dense), on
    `device` (the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3 * HEADS * DIM, generator=gen).to(dtype).to(device)
    q, k, v = (t.reshape(batch, length, HEADS, DIM).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    qb, kb, gamma = (t.to(device) for t in attention_inputs(batch, length, dtype=dtype, seed=seed + 1)[3:])
    return q, k, v, qb, kb, gamma


def truth(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return freq_biased_attention_math(*(t.double() for t in inputs))


def max_error(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> float:
    return (out.double() - truth(inputs)).abs().max().item()


# ---------------------------------------------------------------------------------------------- math


def test_math_equals_sdpa_on_concatenation():
    """REFERENCE.md's identity, which the ONNX decomposition and the benchmark's SDPA baseline rely on."""
    q, k, v, qb, kb, gamma = (t.double() for t in attention_inputs(2, 40, 56))
    concat = F.scaled_dot_product_attention(
        torch.cat([q / DIM**0.5, gamma * qb], dim=-1), torch.cat([k, kb], dim=-1), v, scale=1.0
    )
    torch.testing.assert_close(freq_biased_attention_math(q, k, v, qb, kb, gamma), concat, rtol=0, atol=1e-12)


def test_bias_changes_the_output():
    """The inputs the kernel is checked on make γ·qb·kbᵀ matter, so a kernel dropping it fails."""
    q, k, v, qb, kb, gamma = attention_inputs(1, 64)
    assert (truth((q, k, v, qb, kb, gamma)) - truth((q, k, v, qb, kb, 0 * gamma))).abs().max() > 0.5


# ------------------------------------------------------------------------- the kernel, interpreted

INTERPRETED = """
import sys, torch
from d3qe_serve.d3qe.attention_kernel import KernelConfig, freq_biased_attention_triton
cases = torch.load(sys.argv[1], weights_only=True)
run = {name: freq_biased_attention_triton(*c["inputs"], config=KernelConfig(*c["config"])) for name, c in cases.items()}
torch.save(run, sys.argv[2])
"""


def _kernel_cases() -> dict[str, dict]:
    cases = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        for batch in (1, 2, 3, 4):
            cases[f"L256-B{batch}-{tag}"] = (attention_inputs(batch, 256, dtype=dtype, seed=batch), (128, 128))
        # Lengths that are not multiples of the tiles: partial row and key tiles, several key tiles.
        cases[f"L200-B3-{tag}"] = (attention_inputs(3, 200, dtype=dtype), (128, 64))
        cases[f"L77-B2-{tag}"] = (attention_inputs(2, 77, dtype=dtype), (64, 32))
        cases[f"L1-B4-{tag}"] = (attention_inputs(4, 1, dtype=dtype), (64, 64))
        # Lq ≠ Lk and head dims that are not powers of two (padded and masked inside the kernel).
        cases[f"Lq50-Lk70-dims32,16,48-B2-{tag}"] = (attention_inputs(2, 50, 70, (32, 16, 48), dtype), (64, 32))
        cases[f"d3at-views-L256-B2-{tag}"] = (d3at_views(2, 256, dtype), (128, 64))
    return {name: {"inputs": inputs, "config": (*tile, 4, 2)} for name, (inputs, tile) in cases.items()}


KERNEL_CASES = _kernel_cases()


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every case run by the Triton kernel under TRITON_INTERPRET=1, in one child process: the variable
    must be set before Triton defines the kernel, and must not leak into this process's other tests."""
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(KERNEL_CASES, folder / "cases.pt")
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED, str(folder / "cases.pt"), str(folder / "outputs.pt")],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        pytest.fail(f"the interpreted kernel failed:\n{done.stderr[-4000:]}")
    return torch.load(folder / "outputs.pt", weights_only=True)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_interpreted_kernel_matches_math(interpreted, name):
    inputs = KERNEL_CASES[name]["inputs"]
    out = interpreted[name]
    q, _, v = inputs[:3]
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
    error = max_error(out, inputs)
    if q.dtype == torch.float32:
        assert error <= FP32_TOL
    else:
        # Also no worse than the released computation in fp16, which rounds its L×L logits to fp16.
        math_error = max_error(freq_biased_attention_math(*inputs), inputs)
        assert error <= FP16_TOL and error <= max(math_error, 1e-3), (error, math_error)


def test_kernel_scalars_are_its_parameters():
    """`SCALARS` orders the int32 arguments for both launchers (PyTorch and TensorRT AOT)."""
    names = attention_kernel._freq_biased_attention_kernel.arg_names
    pointers = [f"{n}_ptr" for n in attention_kernel.INPUTS]
    expected = [*pointers, *attention_kernel.SCALARS, "out_ptr"]
    assert names[: len(expected)] == expected


# ------------------------------------------------------------------- the kernel, compiled ahead of time

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block on A100 and H100


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_every_tiling_compiles_for_sm80_within_shared_memory(dtype):
    """What TensorRT's AOT plugin does at engine build, checked on a machine without a GPU: every tactic
    compiles to PTX (tensor-core MMAs for 16-bit types) and fits an A100's shared memory."""
    for config in attention_kernel.configs_for(dtype):
        kernel = attention_kernel.compile_kernel(dtype, torch.float32, (DIM,) * 3, config, GPUTarget("cuda", 80, 32))
        assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[80], config
        assert kernel.metadata.num_warps == config.num_warps
        ptx = kernel.asm["ptx"]
        assert f".entry {kernel.metadata.name}(" in ptx
        assert ("mma.sync" in ptx) == (dtype != torch.float32)


def test_hopper_aot_build(tmp_path):
    """Tensor-core wgmma on sm_90, and the PTX handed to TensorRT takes exactly the kernel's own arguments
    (Triton's trailing scratch pointers dropped) and still assembles."""
    kernel = attention_kernel.compile_kernel(
        torch.float16, torch.float32, (DIM,) * 3, attention_kernel.HALF_CONFIGS[1], GPUTarget("cuda", 90, 32)
    )
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[90]
    ptx = attention_kernel.aot_ptx(kernel)
    assert re.search(r"\bwgmma\.mma_async", ptx)
    entry = re.search(rf"\.entry {kernel.metadata.name}\((.*?)\)", ptx, re.S).group(1)
    assert entry.count(".param") == len(attention_kernel.INPUTS) + len(attention_kernel.SCALARS) + 1
    (tmp_path / "kernel.ptx").write_text(ptx)
    arch = re.search(r"^\.target (\w+)", ptx, re.M).group(1)
    ptxas = [triton.knobs.nvidia.ptxas.path, f"-arch={arch}", "kernel.ptx", "-o", "kernel.cubin"]
    done = subprocess.run(ptxas, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


SPILL_CHECKS = [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "precision"), SPILL_CHECKS, ids=["fp16", "bf16", "fp32", "tf32"])
def test_no_tiling_spills_registers_on_sm90(dtype, precision):
    """Every tiling the launcher or TensorRT may run on an H100, each dtype and fp32 dot precision: ptxas
    (Triton's own, no GPU needed) reports no spill to local memory and shared memory within the block limit."""
    for config in attention_kernel.configs_for(dtype):
        target = GPUTarget("cuda", 90, 32)
        kernel = attention_kernel.compile_kernel(dtype, torch.float32, (DIM,) * 3, config, target, precision)
        usage = attention_kernel.resource_usage(kernel)
        assert usage.spill_stores == usage.spill_loads == 0, (config, usage)
        assert usage.registers <= 255 and kernel.metadata.shared <= SHARED_MEMORY_LIMIT[90], (config, usage)


def test_the_spill_check_sees_a_spilling_tiling():
    """The tiling dropped for spilling (128×64 on 4 warps, bf16, sm_90) still reads as spilling: the check can
    fail."""
    config = attention_kernel.KernelConfig(128, 64, 4, 3)
    kernel = attention_kernel.compile_kernel(
        torch.bfloat16, torch.float32, (DIM,) * 3, config, GPUTarget("cuda", 90, 32)
    )
    usage = attention_kernel.resource_usage(kernel)
    assert usage.spill_stores > 0 and usage.spill_loads > 0 and usage.registers == 255


def test_fp32_dot_precision_is_read_through_the_api_cuda_fp32_sets():
    """`serving.runtimes.cuda_fp32(tf32=True)` sets torch's per-backend precision; reading the legacy
    `torch.get_float32_matmul_precision()` after that raises ("mix of the legacy and new APIs"): the tf32
    parity row of the GPU run died on it. The kernel reads the API that was set, on any device."""
    from d3qe_serve.serving.runtimes import cuda_fp32

    with cuda_fp32(tf32=True):
        assert attention_kernel.input_precision(torch.float32) == "tf32"
        assert attention_kernel.input_precision(torch.bfloat16) == "ieee"
    with cuda_fp32():
        assert attention_kernel.input_precision(torch.float32) == "ieee"
    assert attention_kernel.input_precision(torch.float32) == "ieee"  # torch's default: "highest"


def test_the_tiling_switches_at_batch_9_on_an_h100():
    """D³AT's 8 heads of 256 tokens on 132 SMs: batches 1-8 run the 64-row tiling, 9 and up the 128-row one, so
    the CUDA tests and every warm-up run a batch on each side."""
    switch = attention_kernel.switch_batch(HEADS, 256, 132)
    assert switch == 9

    def tiling(batch: int) -> attention_kernel.KernelConfig:
        return attention_kernel.default_config(torch.bfloat16, batch * HEADS * triton.cdiv(256, 128), 132)

    assert tiling(switch - 1) == attention_kernel.HALF_CONFIGS[0] != tiling(switch) == attention_kernel.HALF_CONFIGS[1]


# ------------------------------------------------------------------------------ the op's registrations


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    inputs = [t.requires_grad_(requires_grad) for t in attention_inputs(2, 16)]
    torch.library.opcheck(freq_biased_attention, inputs)


def test_opcheck_strided_views():
    torch.library.opcheck(freq_biased_attention, d3at_views(2, 16, torch.float32))


def test_backward_against_finite_differences():
    inputs = [t.double().requires_grad_() for t in attention_inputs(1, 5, 7, (8, 4, 6), heads=2)]
    assert torch.autograd.gradcheck(freq_biased_attention, inputs)


def test_mixed_precision_gamma_keeps_the_activation_dtype():
    """Under autocast γ stays an fp32 parameter beside fp16 activations."""
    inputs = attention_inputs(1, 32, dtype=torch.float16)
    out = freq_biased_attention(*inputs)
    assert out.dtype == torch.float16
    assert max_error(out, inputs) < 2e-2  # the fp16 reference rounds its logits: this is its own error


def _block_and_inputs() -> tuple[FreqBiasedBlock, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    block = FreqBiasedBlock(HEADS * DIM, DIM, 4 * HEADS * DIM).eval()
    return block, torch.randn(2, 256, HEADS * DIM), torch.rand(2, 256) * 1e-3


def test_torch_compile_traces_the_op():
    block, x, freq = _block_and_inputs()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, freq), block(x, freq), rtol=0, atol=1e-6)


def test_torch_export_keeps_the_op_with_a_dynamic_batch():
    block, x, freq = _block_and_inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(block, (x, freq), dynamic_shapes=({0: batch}, {0: batch}))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.d3qe.freq_biased_attention.default) == 1
    x3, freq3 = torch.randn(3, 256, HEADS * DIM), torch.rand(3, 256)
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(x3, freq3), block(x3, freq3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shapes", "problem"),
    [
        ({"q": (2, 8, 16)}, "q must be [B, H, L, D]"),
        ({"k": (2, 8, 16, 32)}, "k has shape (2, 8, 16, 32), expected (2, 8, 16, 64)"),
        ({"v": (2, 4, 16, 64)}, "v has shape (2, 4, 16, 64)"),
        ({"kb": (2, 8, 12, 64)}, "kb has shape (2, 8, 12, 64)"),
        ({"k": (2, 8, 0, 64), "v": (2, 8, 0, 64), "kb": (2, 8, 0, 64)}, "the key sequence is empty"),
        ({"gamma": (2,)}, "gamma must be one floating number"),
    ],
)
def test_bad_shapes_are_named(shapes, problem):
    named = dict(zip(("q", "k", "v", "qb", "kb", "gamma"), attention_inputs(2, 16), strict=True))
    named.update({name: torch.zeros(shape) for name, shape in shapes.items()})
    with pytest.raises(ValueError, match=re.escape(problem)):
        freq_biased_attention(*named.values())


def test_mixed_dtypes_are_named():
    q, k, v, qb, kb, gamma = attention_inputs(1, 8)
    with pytest.raises(ValueError, match="must share one floating dtype"):
        check_inputs(q, k, v.half(), qb, kb, gamma)


# ------------------------------------------------------------------------------------------------ ONNX


class _Attention(torch.nn.Module):
    """The op with γ as a parameter, as in D³AT (so it becomes an ONNX initializer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.tensor([0.3]))

    def forward(self, q, k, v, qb, kb):
        return freq_biased_attention(q, k, v, qb, kb, self.gamma)


ONNX_INPUTS = ["q", "k", "v", "qb", "kb"]


def _export(path: Path, dtype: torch.dtype = torch.float32, **table_options) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        _Attention().eval(),
        tuple(t.to(dtype) for t in attention_inputs(2, 77)[:5]),
        dynamo=True,
        input_names=ONNX_INPUTS,
        output_names=["out"],
        dynamic_shapes=tuple({0: batch} for _ in ONNX_INPUTS),
        custom_translation_table=translation_table(**table_options),
        opset_version=18,
        verbose=False,
    )
    program.save(path)
    return onnx.load(path)


def test_onnx_decomposition_equals_the_op_in_onnxruntime(tmp_path):
    model = _export(tmp_path / "attention.onnx")
    assert {n.domain for n in model.graph.node} == {""}  # standard ops only
    session = ort.InferenceSession(str(tmp_path / "attention.onnx"), providers=["CPUExecutionProvider"])
    inputs = attention_inputs(3, 77, seed=5)  # another batch than the traced one
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(ONNX_INPUTS, inputs, strict=False)})
    assert max_error(torch.from_numpy(out), inputs) <= FP32_TOL


def test_onnx_decomposition_in_fp16_loads_and_runs(tmp_path):
    """A reduced-precision export keeps one dtype through the scale (no fp32 constant beside fp16)."""
    _export(tmp_path / "attention16.onnx", dtype=torch.float16)
    session = ort.InferenceSession(str(tmp_path / "attention16.onnx"), providers=["CPUExecutionProvider"])
    inputs = attention_inputs(3, 77, seed=5)
    (out,) = session.run(None, {name: t.half().numpy() for name, t in zip(ONNX_INPUTS, inputs, strict=False)})
    assert out.dtype == np.float16
    assert max_error(torch.from_numpy(out).float(), inputs) <= 1e-2


def test_onnx_plugin_node(tmp_path):
    model = _export(tmp_path / "attention_plugin.onnx", plugin=True)
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == (PLUGIN_NAMESPACE, PLUGIN_NAME)
    assert attributes == {"plugin_namespace": PLUGIN_NAMESPACE.encode(), "aot": 1}
    assert list(node.input[:5]) == ONNX_INPUTS and list(node.output) == ["out"]


# ---------------------------------------------------------------------------------- needs a GPU / TensorRT

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here; the kernel is checked under Triton's interpreter"
)


CUDA_CASES = [(torch.float32, FP32_TOL), (torch.float16, FP16_TOL), (torch.bfloat16, BF16_TOL)]


def cuda_batches() -> list[int]:
    """4, and a batch past the 128-row tiling's switch on this GPU (9 on an H100), at least 9."""
    if not torch.cuda.is_available():
        return [4, 9]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return [4, max(9, attention_kernel.switch_batch(HEADS, 256, sms))]


@needs_cuda
@pytest.mark.parametrize(("dtype", "tol"), CUDA_CASES)
@pytest.mark.parametrize("length", [256, 77])
@pytest.mark.parametrize("batch", cuda_batches())
def test_cuda_op_runs_the_kernel(dtype, tol, length, batch):
    inputs = attention_inputs(batch, length, dtype=dtype)
    on_gpu = [t.cuda() for t in inputs]
    poison = torch.full((batch, HEADS, length, DIM), float("nan"), dtype=dtype, device="cuda")
    # Poisoned memory, freed to the caching allocator: the op's output most likely reuses it, so an element the
    # kernel never wrote reads NaN.
    del poison
    out = freq_biased_attention(*on_gpu)
    assert not out.isnan().any()
    assert max_error(out.cpu(), inputs) <= tol


@needs_cuda
@pytest.mark.parametrize(("dtype", "tol"), CUDA_CASES)
@pytest.mark.parametrize("batch", cuda_batches())
def test_cuda_kernel_takes_the_strided_views_the_head_passes(dtype, tol, batch):
    """q, k, v as D³AT hands them (head-split, transposed views of one Linear output), at both tilings."""
    views = d3at_views(batch, 256, dtype)
    q, k, v, qb, kb, gamma = d3at_views(batch, 256, dtype, device="cuda")
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = freq_biased_attention(q, k, v, qb, kb, gamma)
    assert max_error(out.cpu(), views) <= tol


@needs_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="TensorRT is not installable here (its PyPI packages fetch their wheels from an unreachable host)",
)
def test_tensorrt_plugin_engine_matches_math(tmp_path):
    import tensorrt as trt

    import d3qe_serve.export.tensorrt_plugin  # noqa: F401  (registers the plugin)

    path = tmp_path / "attention_plugin.onnx"
    _export(path, plugin=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ONNX_INPUTS:
        profile.set_shape(name, (1, HEADS, 77, DIM), (4, HEADS, 77, DIM), (8, HEADS, 77, DIM))
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()

    inputs = attention_inputs(3, 77, seed=7)
    feeds = {name: t.cuda().contiguous() for name, t in zip(ONNX_INPUTS, inputs, strict=False)}
    out = torch.empty(3, HEADS, 77, DIM, device="cuda")
    for name, t in feeds.items():
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    context.set_tensor_address("out", out.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().double().numpy(), truth(inputs).numpy(), rtol=0, atol=FP32_TOL)
