"""TensorRT engines from the exported ONNX, through NVIDIA's `tensorrt` Python API.

UNVERIFIED: TensorRT could not be installed where this project was built and tested (PyPI's
`tensorrt-cu13` wheels fetch their libraries from NVIDIA's own index), so this module has never run.
It is written to the documented TensorRT 10 API.

Precision is carried by the ONNX itself (the part exported with fp16/bf16 weights and activations,
the nearest-code search and the frequency lookup kept fp32 by the part's module), and the network
is built STRONGLY_TYPED: TensorRT follows those types instead of choosing per layer, which is how
TensorRT 10 recommends reduced precision and the only way TensorRT 11 offers (its FP16/BF16 builder
flags are gone). One optimisation profile covers batch 1..max_batch, tuned for max_batch (the
dynamic batcher fills batches under load). A timing cache beside the engine makes rebuilds fast.
"""

from __future__ import annotations

from pathlib import Path

from d3qe_serve.d3qe.parts import PartSpec

WORKSPACE_BYTES = 4 << 30


def build_engine(
    spec: PartSpec, onnx_path: Path, plan_path: Path, max_batch: int, timing_cache: Path, plugin: bool = False
) -> None:
    """Parse `onnx_path`, build a serialised engine for batch 1..`max_batch` into `plan_path`."""
    import tensorrt as trt

    if plugin:
        import d3qe_serve.export.tensorrt_plugin  # noqa: F401  (registers d3qe::FreqBiasedAttention with TensorRT)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        profile.set_shape(t.name, t.concrete_shape(1), t.concrete_shape(max_batch), t.concrete_shape(max_batch))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
