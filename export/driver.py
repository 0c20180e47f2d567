"""The export: the parts → validated artifacts and `manifest.json`, laid out as a Triton repository.

`export_model` is what `d3qe export` (cli/export.py) runs; `export_repository` exports a detector already
built, each part as a plan names it (`export.plan.PartChoice`) or by the uniform `--runtime/--precision`
rule; `build_part` builds one part's artifact as a choice says (what a tuner measures); `check_choice`
says why a choice cannot be built here; `reusable_export` finds an existing export of the same weights
(`d3qe demo`).
"""

from __future__ import annotations

import datetime
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from d3qe_serve.contract import LOGIT
from d3qe_serve.d3qe import D3QE
from d3qe_serve.d3qe.parts import EVIDENCE, PART_NAMES, PartSpec, eager_tensors, part_specs
from d3qe_serve.errors import MissingDependencyError, UnsupportedError, ValidationError
from d3qe_serve.export.calibration import CalibrationSet, calibration_feeds, calibration_set
from d3qe_serve.export.plan import (
    EXPORT_PRECISIONS,
    RUNTIMES,
    PartChoice,
    uniform_choice,
    uniform_precision,
)
from d3qe_serve.export.validate import TOLERANCES, Tolerance, validate_chain, validate_part, validation_pixels
from d3qe_serve.serving.host import machine, tool_versions
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest, PartEntry, checkpoint_record, sha256_file
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.runtimes import OPENVINO_PRECISIONS, TORCH_DTYPES, runner_for

ARTIFACTS = {
    "onnxruntime": "model.onnx",
    "openvino": "model.onnx",  # OpenVINO reads the exported ONNX, as NVIDIA's openvino backend can
    "tensorrt": "model.plan",
    "torch": "model.safetensors",
}
OPENVINO_IR = "model.xml"  # OpenVINO static int8: NNCF's IR, its weights beside it in model.bin
VERSION = "1"
_NO_BF16_ORT = "ONNX Runtime's CPU execution provider has no bfloat16 kernels (MatMul, Conv, Add)"
_TRT_INT8 = "TensorRT int8 needs explicit Q/DQ calibration, which this export does not write"
_TORCH_INT8 = "the torch runtime runs fp32, fp16 or bf16 modules; int8 is offered for onnxruntime and openvino"
# Where a (runtime, precision) is not offered, why. Measured or documented, see docs/export.md.
UNSUPPORTED = {
    ("onnxruntime", "fp16"): "slower than fp32 on this CPU (no native fp16 GEMM: CLIP 1.17 vs 1.01 s/image), "
    "and ORT 1.31's full graph optimisation crashes on the fp16 CLIP graph; on a GPU use --runtime tensorrt",
    ("onnxruntime", "bf16"): _NO_BF16_ORT,
    ("onnxruntime", "int8-bf16"): _NO_BF16_ORT,
    ("openvino", "fp16"): "this export runs OpenVINO on the CPU, where it offers fp32, bf16 (on CPUs that compute "
    "it natively) and static int8; on a GPU use --runtime tensorrt",
    ("openvino", "int8-dynamic"): "OpenVINO's int8 here is static, calibrated on corpus images (int8); "
    "dynamic int8 is ONNX Runtime's",
    **{("tensorrt", p): _TRT_INT8 for p in ("int8", "int8-bf16", "int8-dynamic")},
    **{("torch", p): _TORCH_INT8 for p in ("int8", "int8-bf16", "int8-dynamic")},
}


def check_choice(choice: PartChoice, device: str | None = None) -> None:
    """Raise UnsupportedError (MissingDependencyError for a runtime not installed) unless `choice` can be built
    here; with `device`, also unless it can be validated there."""
    if (choice.runtime, choice.precision) in UNSUPPORTED:
        raise UnsupportedError(f"{choice}: {UNSUPPORTED[choice.runtime, choice.precision]}")
    if choice.family not in TOLERANCES:
        raise UnsupportedError(f"{choice}: no measured tolerance to validate {choice.family} against yet")
    if choice.runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise UnsupportedError("--runtime tensorrt: the `tensorrt` package is not installed (pip install tensorrt)")
        if device is not None and not device.startswith("cuda"):
            raise UnsupportedError("--runtime tensorrt builds and validates on a GPU: pass --device cuda")
    if choice.runtime == "openvino":
        needed = ("openvino", "nncf") if choice.calibrated else ("openvino",)
        if missing := [m for m in needed if importlib.util.find_spec(m) is None]:
            raise MissingDependencyError(f"{choice} needs {', '.join(missing)}: pip install 'd3qe-serve[openvino]'")
        if device is not None and device != "cpu":
            raise UnsupportedError(f"{choice}: OpenVINO parts run on the CPU here; pass --device cpu")
        from d3qe_serve.serving.host import openvino_capabilities, openvino_precision_problem

        if problem := openvino_precision_problem(choice.precision, openvino_capabilities()):
            raise UnsupportedError(f"{choice}: {problem}")


def check_supported(runtime: str, precision: str, device: str, plugin: bool = False, compile: bool = False) -> None:
    """Raise UnsupportedError unless `d3qe export --runtime R --precision P` (with those flags) can run here."""
    if plugin and runtime != "tensorrt":
        raise UnsupportedError("--trt-plugin: the fused-attention plugin is a TensorRT plugin; use --runtime tensorrt")
    if compile and runtime != "torch":
        raise UnsupportedError("--compile: torch.compile runs torch-runtime parts; use --runtime torch")
    if runtime not in RUNTIMES or precision not in EXPORT_PRECISIONS:
        raise UnsupportedError(f"--runtime {runtime} --precision {precision}: not a runtime and precision offered")
    try:
        check_choice(PartChoice(runtime, uniform_precision(runtime, precision)), device)
    except UnsupportedError as e:
        raise UnsupportedError(f"--runtime {runtime} --precision {precision}: {str(e).partition(': ')[2]}") from None


def _onnx_dtype(choice: PartChoice) -> torch.dtype:
    """The dtype the ONNX graph computes in: ONNX Runtime's own; OpenVINO's is fp32, reduced when compiled."""
    return TORCH_DTYPES[choice.precision] if choice.runtime == "onnxruntime" else torch.float32


def _write_artifact(
    spec: PartSpec,
    model: D3QE,
    out_dir: Path,
    path: Path,
    choice: PartChoice,
    max_batch: int,
    calibration: CalibrationSet | None,
    plugin: bool,
) -> dict:
    """Write one part's artifact at `path`; returns the runtime-specific fields of its manifest entry."""
    from d3qe_serve.export.onnx_export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if choice.runtime == "torch":
        from d3qe_serve.export.torch_part import save_torch_part

        save_torch_part(spec, model, path, TORCH_DTYPES[choice.precision])
        return {}
    extra: dict = {"opset": spec.opset}
    if choice.runtime == "openvino":
        extra["inference_precision"] = OPENVINO_PRECISIONS[choice.precision]
    if choice.runtime == "tensorrt":
        from d3qe_serve.export.tensorrt import build_engine

        build_dir = out_dir / spec.name / "tensorrt"  # Triton reads only the numbered version folders
        source = build_dir / "model.onnx"
        export_onnx(spec, model, source, max_batch, TORCH_DTYPES[choice.precision], plugin=plugin)
        build_engine(spec, source, path, max_batch, build_dir / "timing.cache", plugin=plugin)
        extra.update(source_onnx=str(source.relative_to(out_dir)), plugin=plugin)
    elif choice.quantization is None:
        export_onnx(spec, model, path, max_batch, _onnx_dtype(choice))
    else:
        from d3qe_serve.export import quantize

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32 = Path(tmp) / "model.onnx"
            export_onnx(spec, model, fp32, max_batch)
            if choice.quantization == "dynamic":
                quantized = quantize.quantize_int8(spec, fp32, path)
            else:
                if calibration is None:
                    raise ValueError(f"{spec.name} {choice}: static int8 needs a calibration set (export.calibration)")
                feeds = calibration_feeds(spec, model, calibration)
                quantizer = quantize.quantize_nncf if choice.runtime == "openvino" else quantize.quantize_static_qdq
                quantized = quantizer(spec, fp32, path, feeds)
                extra["calibration"] = calibration.record()
        extra.update(quantization=choice.quantization, quantized=quantized)
    return extra


def build_part(
    spec: PartSpec,
    model: D3QE,
    out_dir: Path,
    choice: PartChoice,
    *,
    max_batch: int,
    calibration: CalibrationSet | None = None,
    plugin: bool = False,
) -> PartEntry:
    """Build `spec`'s part of `model` as `choice` says, at `out_dir/<part>/1/<artifact>` (replacing what is there);
    returns its manifest entry, not yet validated (`validation` empty).

    Any (runtime, precision) the runtime offers is built for any part, whatever the part declares
    (`PartSpec.fp32_only`, `int8_scopes` decide only what `d3qe export` builds, `uniform_choice`): a tuner
    builds the candidates it measures. Static int8 quantises the part's `int8_scopes` where it has some,
    else the whole part, but its first and last layers (`export.quantize.static_nodes`), calibrated on
    `calibration` (required for it; see `export.calibration`). OpenVINO's static int8 is an IR
    (`model.xml`, its weights in `model.bin`, listed in `PartEntry.extra_files`); every other artifact one file.
    Raises UnsupportedError (or MissingDependencyError) for a choice that cannot be built here.
    """
    check_choice(choice)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    out_dir = Path(out_dir)
    ir = choice.runtime == "openvino" and choice.calibrated
    path = out_dir / spec.name / VERSION / (OPENVINO_IR if ir else ARTIFACTS[choice.runtime])
    for name in {*ARTIFACTS.values(), OPENVINO_IR, "model.bin"}:  # another build's, which would be served too
        (path.parent / name).unlink(missing_ok=True)
    start = time.perf_counter()
    extra = _write_artifact(spec, model, out_dir, path, choice, max_batch, calibration, plugin)
    if ir:
        weights = path.with_suffix(".bin")
        extra["extra_files"] = {str(weights.relative_to(out_dir)): sha256_file(weights)}
    return PartEntry(
        runtime=choice.runtime,
        precision=choice.family,
        file=str(path.relative_to(out_dir)),
        sha256=sha256_file(path),
        bytes=path.stat().st_size + sum((out_dir / f).stat().st_size for f in extra.get("extra_files", {})),
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        dynamic_axes={t: {str(a): n for a, n in axes.items()} for t, axes in spec.dynamic_axes().items()},
        max_batch=max_batch,
        export_seconds=round(time.perf_counter() - start, 1),
        **extra,
    )


def chain_tolerance(families: Iterable[str]) -> Tolerance:
    """The whole chain's tolerance where its parts compute at these precision families: the loosest of each."""
    rows = [TOLERANCES[f] for f in set(families)]
    bounds: dict[str, float] = {}
    for row in rows:
        for name, bound in row.max_abs.items():
            bounds[name] = max(bounds.get(name, bound), bound)
    return Tolerance(bounds, min(row.min_index_agreement for row in rows))


def _loosest(families: Iterable[str]) -> str:
    """The family whose logit tolerance is widest: what a mixed export's `Manifest.precision` names."""
    return max(set(families), key=lambda f: TOLERANCES[f].max_abs[LOGIT])


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
    plan: Mapping[str, PartChoice] | None = None,
    calibration: CalibrationSet | None = None,
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

    Each part is built as `plan` names it (`PartChoice` by part name); a part `plan` does not name is built
    as `d3qe export --runtime runtime --precision precision` builds it (`uniform_choice`).
    `calibration`: the images static int8 is calibrated on (default: `calibration_set` away from the
    validation pool); it must not share an image with the validation pool.
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
    specs = part_specs(model.cfg)
    plan = dict(plan or {})
    if unknown := sorted(plan.keys() - specs.keys()):
        raise ValueError(f"the plan names parts {unknown} this model does not have; it has {sorted(specs)}")
    choices = {name: plan.get(name) or uniform_choice(spec, runtime, precision) for name, spec in specs.items()}
    for choice in set(choices.values()):
        check_choice(choice, device)
    if compile and (other := sorted(n for n, c in choices.items() if c.runtime != "torch")):
        raise UnsupportedError(f"--compile: torch.compile runs torch-runtime parts; {', '.join(other)} are not")
    weights = weights or WeightOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels, names = validation_pixels(images)
    if any(c.calibrated for c in choices.values()):
        if calibration is None:
            log("calibration: corpus images away from the validation pool …")
            calibration = calibration_set(exclude=names)
        elif shared := sorted(set(calibration.names) & {n.removeprefix("corpus:") for n in names}):
            raise ValueError(f"calibration images {shared} are in the validation pool: hold them apart")
    reference = eager_tensors(model, pixels)
    codebook = model.vq_model.quantize.embedding.weight.detach().numpy()
    families = [c.family for c in choices.values()]
    manifest = new_manifest(
        model, weights=weights, runtime=runtime, precision=precision, max_batch=max_batch, device=device
    )
    manifest.validation_inputs = names
    runners = {}
    for i, (name, spec) in enumerate(specs.items(), 1):
        choice = choices[name]
        note = "" if plan or choice.family == precision else f" ({precision} not applied to this part, see parts.py)"
        log(f"[{i}/{len(specs)}] {name}: writing {choice}{note} …")
        entry = build_part(spec, model, out_dir, choice, max_batch=max_batch, calibration=calibration, plugin=plugin)
        manifest.parts[name] = entry
        log(f"      {entry.file}: {entry.bytes / 1e6:.1f} MB in {entry.export_seconds:.1f} s; validating …")
        runners[name] = runner_for(out_dir, manifest, name, device)
        result = validate_part(runners[name], spec, reference, TOLERANCES[choice.family], max_batch, codebook)
        entry.validation = result
        verdict = "ok" if result["passed"] else "FAILED: " + "; ".join(result["problems"])
        log(f"      batches {', '.join(result['batches'])}: {_summary(result['worst'])} — {verdict}")
    if plan:  # per part where they differ (as `Manifest.describe`); the precision whose tolerance is widest
        manifest.runtime, manifest.precision = manifest.describe()[0], _loosest(families)
    log(f"end to end: {len(pixels)} images through the artifacts …")
    chain = validate_chain(runners, specs, reference, chain_tolerance(families), max_batch, codebook)
    manifest.end_to_end = chain
    log(f"      {_summary(chain['measured'])} — {'ok' if chain['passed'] else 'FAILED'}")
    failures = [f"{n}: {p}" for n, e in manifest.parts.items() for p in e.validation["problems"]]
    failures += [f"end to end: {p}" for p in chain["problems"]]
    manifest.passed = not failures
    manifest.write(out_dir)
    if failures:
        what = " ".join(manifest.describe())
        raise ValidationError(
            f"the {what} export in {out_dir} is beyond tolerance (see its manifest.json):\n  " + "\n  ".join(failures)
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
    plan: Mapping[str, PartChoice] | None = None,
    calibration: CalibrationSet | None = None,
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
        plan=plan,
        calibration=calibration,
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
