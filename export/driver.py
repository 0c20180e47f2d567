"""The export: the parts → validated artifacts and `manifest.json`, laid out as a Triton repository.

`export_model` is what `d3qe export` (cli/export.py) runs; `export_repository` exports a detector already
built; `reusable_export` finds an existing export of the same weights (`d3qe demo`).
"""

from __future__ import annotations

import datetime
import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import EVIDENCE, PART_NAMES, PartSpec, eager_tensors, part_specs
from d3qe_serve.errors import UnsupportedError, ValidationError
from d3qe_serve.export.validate import TOLERANCES, validate_chain, validate_part, validation_pixels
from d3qe_serve.serving.host import machine, tool_versions
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest, PartEntry, checkpoint_record, sha256_file
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.runtimes import TORCH_DTYPES, runner_for

RUNTIMES = ("onnxruntime", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ARTIFACTS = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "torch": "model.safetensors"}
VERSION = "1"
# Where a precision is not offered, why. Measured or documented, see docs/export.md.
UNSUPPORTED = {
    ("onnxruntime", "fp16"): "slower than fp32 on this CPU (no native fp16 GEMM: CLIP 1.17 vs 1.01 s/image), "
    "and ORT 1.31's full graph optimisation crashes on the fp16 CLIP graph; on a GPU use --runtime tensorrt",
    ("onnxruntime", "bf16"): "ONNX Runtime's CPU execution provider has no bfloat16 kernels (MatMul, Conv, Add)",
    ("tensorrt", "int8"): "TensorRT int8 needs explicit Q/DQ calibration, which this export does not write",
    ("torch", "int8"): "the torch runtime runs fp32, fp16 or bf16 modules; int8 is offered for onnxruntime",
}


def check_supported(runtime: str, precision: str, device: str, plugin: bool = False, compile: bool = False) -> None:
    if plugin and runtime != "tensorrt":
        raise UnsupportedError("--trt-plugin: the fused-attention plugin is a TensorRT plugin; use --runtime tensorrt")
    if compile and runtime != "torch":
        raise UnsupportedError("--compile: torch.compile runs torch-runtime parts; use --runtime torch")
    if (runtime, precision) in UNSUPPORTED:
        raise UnsupportedError(f"--runtime {runtime} --precision {precision}: {UNSUPPORTED[runtime, precision]}")
    if precision not in TOLERANCES:
        raise UnsupportedError(f"--precision {precision}: no measured tolerance to validate it against yet")
    if runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise UnsupportedError("--runtime tensorrt: the `tensorrt` package is not installed (pip install tensorrt)")
        if not device.startswith("cuda"):
            raise UnsupportedError("--runtime tensorrt builds and validates on a GPU: pass --device cuda")


def part_precision(spec: PartSpec, precision: str) -> str:
    """The precision a part is exported at: int8 only where the part declares where (the rest stays fp32),
    and fp32 for a part declared `fp32_only`."""
    return "fp32" if spec.fp32_only or (precision == "int8" and not spec.int8_scopes) else precision


def _write_artifact(
    spec: PartSpec, model: D3QE, out_dir: Path, runtime: str, precision: str, max_batch: int, plugin: bool
) -> tuple[Path, dict]:
    """Write one part's artifact; returns its path and the runtime-specific fields of its manifest entry."""
    from d3qe_serve.export.onnx_export import export_onnx

    path = out_dir / spec.name / VERSION / ARTIFACTS[runtime]
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if runtime == "torch":
        from d3qe_serve.export.torch_part import save_torch_part

        save_torch_part(spec, model, path, TORCH_DTYPES[precision])
        return path, extra
    extra["opset"] = spec.opset
    if runtime == "onnxruntime" and precision == "int8":
        from d3qe_serve.export.quantize import quantize_int8

        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            fp32 = Path(tmp) / "model.onnx"
            export_onnx(spec, model, fp32, max_batch)
            quantize_int8(spec, fp32, path)
        extra["quantization"] = f"onnxruntime quantize_dynamic: MatMul/Gemm in {', '.join(spec.int8_scopes)}"
    elif runtime == "onnxruntime":
        export_onnx(spec, model, path, max_batch, TORCH_DTYPES[precision])
    else:
        from d3qe_serve.export.tensorrt import build_engine

        build_dir = out_dir / spec.name / "tensorrt"  # Triton reads only the numbered version folders
        source = build_dir / "model.onnx"
        export_onnx(spec, model, source, max_batch, TORCH_DTYPES[precision], plugin=plugin)
        build_engine(spec, source, path, max_batch, build_dir / "timing.cache", plugin=plugin)
        extra.update(source_onnx=str(source.relative_to(out_dir)), plugin=plugin)
    return path, extra


def new_manifest(
    model: D3QE,
    *,
    weights: WeightOptions,
    runtime: str,
    precision: str,
    max_batch: int,
    device: str,
) -> Manifest:
    """The manifest of an export about to be written: weights, architecture, machine and tools; no parts yet."""
    return Manifest(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine(device),
        tools=tool_versions(commit=True),
        checkpoint=checkpoint_record(weights.checkpoint),
        vq_checkpoint=checkpoint_record(weights.vq_checkpoint),
        freq_bias=model.freq_bias,
        config=model.cfg.to_json(),
        runtime=runtime,
        precision=precision,
        max_batch=max_batch,
        seeded_weights=None if weights.checkpoint else {"preset": weights.preset, "seed": weights.seed},
    )


def _summary(measured: dict[str, dict]) -> str:
    parts = []
    for name, r in measured.items():
        if "agreement" in r:
            parts.append(f"{name} {r['agreement']:.2%} equal ({r.get('near_ties', 0)} near-tie tokens)")
        elif "max_abs" in r:
            parts.append(f"{name} max|Δ| {r['max_abs']:.2g}")
        else:
            parts.append(f"{name} {r['error']}")
    return ", ".join(parts)


def export_repository(
    model: D3QE,
    out_dir: Path,
    *,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    max_batch: int = 8,
    weights: WeightOptions | None = None,
    images: Sequence[Path] = (),
    plugin: bool = False,
    device: str = "cpu",
    native_configs: bool = False,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Export, validate and describe the parts of `model` under `out_dir`; returns the manifest.

    `weights`: the options `model` was built with, recorded in the manifest (its `freq_bias` is the model's;
    None: seeded weights of the default preset and seed).
    `images`: up to 8 images to validate on besides seeded pixels; `device`: where validation runs (cpu,
    cuda, cuda:N); `plugin`: TensorRT's fused-attention plugin; `compile`: the torch runtime's parts served
    through torch.compile; `native_configs`: also the configs for NVIDIA's container (`configs/native.pbtxt`).
    Writes `manifest.json` even when validation fails (with the failures in it), then raises ValidationError.
    """
    check_supported(runtime, precision, device, plugin, compile)
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    weights = weights or WeightOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = part_specs(model.cfg)
    pixels, names = validation_pixels(images)
    reference = eager_tensors(model, pixels)
    codebook = model.vq_model.quantize.embedding.weight.detach().numpy()
    manifest = new_manifest(
        model,
        weights=weights,
        runtime=runtime,
        precision=precision,
        max_batch=max_batch,
        device=device,
    )
    manifest.validation_inputs = names
    runners = {}
    for i, (name, spec) in enumerate(specs.items(), 1):
        precision_here = part_precision(spec, precision)
        note = "" if precision_here == precision else f" ({precision} not applied to this part, see parts.py)"
        log(f"[{i}/{len(specs)}] {name}: writing {runtime} {precision_here}{note} …")
        start = time.perf_counter()
        path, extra = _write_artifact(spec, model, out_dir, runtime, precision_here, max_batch, plugin)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        manifest.parts[name] = PartEntry(
            runtime=runtime,
            precision=precision_here,
            file=str(path.relative_to(out_dir)),
            sha256=sha256_file(path),
            bytes=size,
            inputs=list(spec.inputs),
            outputs=list(spec.outputs),
            dynamic_axes={t: {str(a): n for a, n in axes.items()} for t, axes in spec.dynamic_axes().items()},
            max_batch=max_batch,
            export_seconds=round(seconds, 1),
            **extra,
        )
        log(f"      {path.relative_to(out_dir)}: {size / 1e6:.1f} MB in {seconds:.1f} s; validating …")
        runners[name] = runner_for(out_dir, manifest, name, device)
        result = validate_part(runners[name], spec, reference, TOLERANCES[precision_here], max_batch, codebook)
        manifest.parts[name].validation = result
        verdict = "ok" if result["passed"] else "FAILED: " + "; ".join(result["problems"])
        log(f"      batches {', '.join(result['batches'])}: {_summary(result['worst'])} — {verdict}")
    log(f"end to end: {len(pixels)} images through the artifacts …")
    chain = validate_chain(runners, specs, reference, TOLERANCES[precision], max_batch, codebook)
    manifest.end_to_end = chain
    log(f"      {_summary(chain['measured'])} — {'ok' if chain['passed'] else 'FAILED'}")
    failures = [f"{n}: {p}" for n, e in manifest.parts.items() for p in e.validation["problems"]]
    failures += [f"end to end: {p}" for p in chain["problems"]]
    manifest.passed = not failures
    manifest.write(out_dir)
    if failures:
        raise ValidationError(
            f"the {runtime} {precision} export in {out_dir} is beyond tolerance (see its manifest.json):\n  "
            + "\n  ".join(failures)
        )
    served_on = "cuda" if device.startswith("cuda") else "cpu"
    write_repository(out_dir, manifest, native=native_configs, device=served_on, compile=compile)
    return manifest


def export_model(
    weights: WeightOptions,
    out_dir: Path,
    *,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    max_batch: int = 8,
    images: Sequence[Path] = (),
    plugin: bool = False,
    device: str = "cpu",
    native_configs: bool = False,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build the detector `weights` name and export it (`export_repository`); returns the manifest."""
    return export_repository(
        weights.load(),
        out_dir,
        runtime=runtime,
        precision=precision,
        max_batch=max_batch,
        weights=weights,
        images=images,
        plugin=plugin,
        device=device,
        native_configs=native_configs,
        compile=compile,
        log=log,
    )


def reusable_export(repo: Path, weights: WeightOptions) -> Manifest | None:
    """The manifest of a validated export at `repo` of exactly these weights, with every part this version
    exports and intact artifacts; else None."""
    try:
        manifest = Manifest.read(repo)
        for part in manifest.parts:
            manifest.artifact(repo, part)
    except (FileNotFoundError, ValueError):
        return None
    same_weights = (
        manifest.passed
        and manifest.parts.keys() == {*PART_NAMES, EVIDENCE}
        and manifest.freq_bias == weights.freq_bias
        and manifest.checkpoint == checkpoint_record(weights.checkpoint)
        and manifest.vq_checkpoint == checkpoint_record(weights.vq_checkpoint)
        and (weights.checkpoint or manifest.seeded_weights == {"preset": weights.preset, "seed": weights.seed})
    )
    return manifest if same_weights else None
