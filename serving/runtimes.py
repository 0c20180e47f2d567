"""In-process runners of exported parts, read from a repository's manifest.

`load_part(repo_dir, part)` is what the Triton python-backend model (`model_repository/part.py`), the
export's validation and the benchmarks call:
`runner(feeds)` takes numpy arrays by input name and returns numpy arrays by output name;
`runner.run_tensors(feeds)` takes torch tensors on any device and returns them on the runner's, so
that on a GPU the Triton models hand tensors from part to part without a trip through host memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from d3qe_serve.contract import entrances
from d3qe_serve.errors import MissingProviderError
from d3qe_serve.serving.manifest import Manifest, PartEntry

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# OpenVINO's INFERENCE_PRECISION_HINT for each precision an OpenVINO part is built at (export.plan.PRECISIONS),
# always said: on CPUs with AVX512-BF16 or AMX, OpenVINO computes an fp32 model in bf16 unless told otherwise.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8-bf16": "bf16"}


# The tensors the entrances return. They leave the ensemble for its gate, a CPU-only python model that receives
# them through BLS: a part hands them over in host memory (`handed_on`), or every gate process would create a
# CUDA context, and hold GPU memory, to read a CUDA tensor. Tensors passed between parts stay on the device.
GATE_TENSORS = frozenset(name for entrance in entrances().values() for name in entrance.output_names)


def handed_on(outputs: dict[str, torch.Tensor], host: frozenset[str] = GATE_TENSORS) -> dict[str, torch.Tensor]:
    """A part's outputs as a Triton model hands them on: dense (DLPack takes no views; the torch VQ residual is
    a permuted one), those named in `host` in host memory, the others where they are."""
    return {name: (t.cpu() if name in host else t).contiguous() for name, t in outputs.items()}


@contextlib.contextmanager
def cuda_fp32(tf32: bool = False) -> Iterator[None]:
    """fp32 CUDA convolutions and matmuls as IEEE fp32 within the block (torch lets cuDNN convolutions use
    TF32, a 10-bit mantissa, by default), or as TF32 where `tf32`. No effect on a CPU."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _numpy_type(tensor: torch.Tensor) -> type:
    return np.dtype(_dtype_name(tensor.dtype)).type


def _dtype_name(dtype: np.dtype | torch.dtype) -> str:
    """numpy's name of a numpy or torch dtype (they agree but for torch's prefix)."""
    return str(dtype).removeprefix("torch.")


class PartRunner:
    """Checks the feeds against the part's declared inputs, then runs it (`_run` in each runtime)."""

    def __init__(self, part: str, entry: PartEntry) -> None:
        self.part = part
        self.inputs = entry.inputs
        self.outputs = entry.outputs
        self.max_batch = entry.max_batch
        self.input_names = entry.input_names
        self.output_names = entry.output_names
        self.device = torch.device("cpu")

    def check(self, feeds: dict[str, np.ndarray] | dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming every missing input and every wrong dtype, shape or batch size."""
        problems = [f"missing input {t.name}" for t in self.inputs if t.name not in feeds]
        batches = set()
        for t in self.inputs:
            if t.name not in feeds:
                continue
            a = feeds[t.name]
            dtype = _dtype_name(a.dtype)
            if dtype != np.dtype(t.dtype).name:
                problems.append(f"{t.name} has dtype {dtype}, expected {t.dtype}")
            want = t.shape
            if a.ndim != len(want) or any(w != -1 and w != s for w, s in zip(want, a.shape, strict=False)):
                problems.append(f"{t.name} has shape {list(a.shape)}, expected {list(want)} (-1: batch)")
            elif a.ndim:
                batches.add(a.shape[0])
        if len(batches) > 1:
            problems.append(f"inputs disagree on the batch size: {sorted(batches)}")
        elif batches and not 1 <= (b := batches.pop()) <= self.max_batch:
            problems.append(f"batch of {b}; this export takes 1 to {self.max_batch}")
        if problems:
            raise ValueError(f"{self.part}: " + "; ".join(problems))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        outputs = self._run({n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names})
        return {n: t.cpu().numpy() for n, t in outputs.items()}

    def run_tensors(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors on any device in; out on the runner's device (`self.device`), by output name."""
        self.check(feeds)
        return self._run({n: feeds[n].contiguous() for n in self.input_names})

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class OnnxRuntimeRunner(PartRunner):
    """An ONNX Runtime session: the CUDA execution provider on a `cuda` device (MissingProviderError when the
    installed onnxruntime has none), the CPU one on `cpu`.

    Inputs and outputs are bound to torch tensors' memory (I/O binding), the same way on CPU and CUDA: on
    CUDA nothing goes through host memory.
    """

    def __init__(
        self, part: str, entry: PartEntry, path: Path, device: str = "cpu", threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        super().__init__(part, entry)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingProviderError(
                    f"{part}: asked to run on {device}, but the installed onnxruntime has no CUDA execution provider "
                    f"(it has {ort.get_available_providers()}): pip install onnxruntime-gpu in place of onnxruntime, "
                    "or run this part on cpu"
                )
            device_id = int(device.partition(":")[2] or 0)
            # Its convolutions and matmuls default to TF32 on Ampere and later: fp32 artifacts stay fp32.
            cuda = {"device_id": device_id, "use_tf32": 0 if entry.precision == "fp32" else 1}
            providers.insert(0, ("CUDAExecutionProvider", cuda))
            self.device = torch.device("cuda", device_id)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # 15 % faster VQ than BASIC
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {n: t.to(self.device) for n, t in feeds.items()}
        batch = len(next(iter(feeds.values())))
        outputs = {
            t.name: torch.empty((batch, *t.dims), dtype=getattr(torch, t.dtype), device=self.device)
            for t in self.outputs
        }
        binding = self.session.io_binding()
        device = (self.device.type, self.device.index or 0)
        for name, tensor in feeds.items():
            binding.bind_input(name, *device, _numpy_type(tensor), tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, *device, _numpy_type(tensor), tuple(tensor.shape), tensor.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the input copies, before ORT's stream reads them
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


class OpenVinoRunner(PartRunner):
    """The part's ONNX (static int8: NNCF's OpenVINO IR) read and compiled by OpenVINO for the CPU: one stream
    (one inference at a time, as a Triton instance runs them), `threads` inference threads, the precision hint
    the manifest names (`PartEntry.inference_precision`).

    Thread pinning is off: each Triton instance is a process of its own, and pinned, all would take the
    same first cores.
    """

    def __init__(
        self, part: str, entry: PartEntry, path: Path, device: str = "cpu", threads: int | None = None
    ) -> None:
        import openvino as ov

        super().__init__(part, entry)
        if device != "cpu":
            raise MissingProviderError(f"{part}: its OpenVINO artifact runs on the CPU here, not on {device}")
        hint = entry.inference_precision or OPENVINO_PRECISIONS[entry.precision]
        self.config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_PRECISION_HINT": hint,
            "ENABLE_CPU_PINNING": "NO",
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.ports = {name: self.compiled.output(name) for name in self.output_names}

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {n: t.cpu().numpy() for n, t in feeds.items()}
        results = self.request.infer(arrays, share_inputs=True)
        return {n: torch.from_numpy(np.array(results[port])) for n, port in self.ports.items()}


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled part runs at: powers of two below `max_batch`, and `max_batch`."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


class TorchRunner(PartRunner):
    """The part's eager module (`d3qe.parts`), built on the meta device and filled from `model.safetensors`.

    `compile`: the module through `torch.compile` (Inductor; on CUDA with CUDA graphs, mode
    "reduce-overhead"), each batch padded up to one of a few fixed sizes (`batch_buckets`), so that
    a shape is compiled, and captured, once.
    """

    def __init__(
        self,
        part: str,
        manifest: Manifest,
        path: Path,
        device: str = "cpu",
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        import safetensors.torch

        from d3qe_serve.d3qe import D3QE
        from d3qe_serve.d3qe.parts import part_specs

        entry = manifest.parts[part]
        super().__init__(part, entry)
        if threads:
            torch.set_num_threads(threads)  # process-wide: each Triton model instance is its own process
        self.device = torch.device(device)
        cfg = manifest.d3qe_config()
        tensors = safetensors.torch.load_file(str(path), device=device)
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = D3QE(cfg, freq_bias=manifest.freq_bias)
            module = part_specs(cfg)[part].module(model, TORCH_DTYPES[entry.precision])
        expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        missing, unknown = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unknown:
            raise ValueError(f"{path} does not hold the {part} part: missing {missing[:10]}, unknown {unknown[:10]}")
        persistent = module.state_dict().keys()
        module.load_state_dict({k: tensors[k] for k in persistent}, strict=True, assign=True)
        for name in expected.keys() - persistent:  # CLIP's mean/std: non-persistent buffers, saved all the same
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner).register_buffer(attr, tensors[name], persistent=False)
        self.module = module.eval()
        self.buckets: tuple[int, ...] = ()
        if compile:
            self.buckets = batch_buckets(self.max_batch)
            # one graph per bucket: more than dynamo's default 8 recompilations of one frame
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.buckets) + 1)
            graphs = self.device.type == "cuda"
            self.module = torch.compile(module, mode="reduce-overhead" if graphs else "default", dynamic=False)

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[n].to(self.device) for n in self.input_names]
        batch = len(args[0])
        if self.buckets:
            size = next(b for b in self.buckets if b >= batch)  # check() held batch to max_batch
            args = [torch.cat([a, a[-1:].expand(size - batch, *a.shape[1:])]) if size > batch else a for a in args]
            torch.compiler.cudagraph_mark_step_begin()  # a new call: the previous one's outputs are ours now
        with torch.inference_mode(), cuda_fp32():  # fp32 parts held to fp32 on a GPU too
            outs = self.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if self.buckets:  # CUDA graphs reuse their output memory on the next call: copies, unpadded
            outs = tuple(o[:batch].clone() for o in outs)
        return dict(zip(self.output_names, outs, strict=True))


class TensorRTRunner(PartRunner):
    """A deserialised TensorRT engine run with `execute_async_v3` on torch-allocated CUDA buffers.

    An engine built with the fused-attention plugin carries its ahead-of-time kernel: nothing to register.
    """

    def __init__(self, part: str, entry: PartEntry, path: Path, device: str = "cuda") -> None:
        import tensorrt as trt

        super().__init__(part, entry)
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialise the engine (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.torch_dtypes = {
            n: getattr(torch, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name) for n in self.output_names
        }

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {n: t.to(self.device) for n, t in feeds.items()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.torch_dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copies
        for tensor in (*inputs.values(), *outputs.values()):  # allocated on the current stream, used on ours
            tensor.record_stream(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.part}: TensorRT execution failed")
        self.stream.synchronize()
        return outputs


def runner_for(
    repo_dir: Path,
    manifest: Manifest,
    part: str,
    device: str = "cpu",
    threads: int | None = None,
    compile: bool = False,
) -> PartRunner:
    """The runner of `part` as `manifest` describes it, unchecked: the export validates its artifacts through this.

    `compile` (torch runtime only): `TorchRunner` compiled with Inductor.
    """
    entry = manifest.parts[part]
    path = Path(repo_dir) / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"{part}: artifact {path} named in the manifest is missing")
    if compile and entry.runtime != "torch":
        raise ValueError(f"{part}: compile applies to the torch runtime; this part is exported for {entry.runtime}")
    if entry.runtime == "onnxruntime":
        return OnnxRuntimeRunner(part, entry, path, device, threads)
    if entry.runtime == "openvino":
        return OpenVinoRunner(part, entry, path, device, threads)
    if entry.runtime == "torch":
        return TorchRunner(part, manifest, path, device, threads, compile)
    if entry.runtime == "tensorrt":
        return TensorRTRunner(part, entry, path, device)
    raise ValueError(f"{part}: unknown runtime {entry.runtime!r} in the manifest")


def load_part(
    repo_dir: Path, part: str, device: str = "cpu", threads: int | None = None, compile: bool = False
) -> PartRunner:
    """The runner of one exported part of the repository at `repo_dir`, its artifact checked first
    (`Manifest.artifact`: validated at export, and the very file validated).

    `threads`: intra-op threads on CPU (ONNX Runtime, OpenVINO, torch); None leaves the runtime's default.
    `compile`: a torch-runtime part compiled with Inductor (`TorchRunner`).
    """
    manifest = Manifest.read(Path(repo_dir))
    manifest.artifact(Path(repo_dir), part)
    return runner_for(Path(repo_dir), manifest, part, device, threads, compile)
