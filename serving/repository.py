"""The Triton model repository around the exported parts: configs, python-backend models, ensembles and their gates.

Every config is built as tritonclient's `ModelConfig` protobuf message and written in its text format,
so each field is one Triton knows. The python-backend models are the package `model_repository`'s
modules, each copied in as `<model>/1/model.py`; the parameters they read are typed
(`serving.model_params`). Layout written under `out_dir` (the parts' artifacts and `manifest.json`
are the export's):

    preprocess/      config.pbtxt, 1/model.py, warmup/image   IMAGE bytes → PIXELS
    preprocess_rgb/  config.pbtxt, 1/model.py                 RGB uint8 [H, W, 3] → PIXELS
    check_pixels/    config.pbtxt, 1/model.py                 PIXELS → CHECKED (finite, in [0, 1])
    <part>/          config.pbtxt, 1/model.py [, configs/native.pbtxt]   vq_encoder, clip_visual, d3qe_head
    d3qe_pipeline/         ensemble: IMAGE → preprocess → vq_encoder ∥ clip_visual → d3qe_head → LOGIT, PROB
    d3qe_rgb_pipeline/     ensemble: RGB → preprocess_rgb → the same three parts → LOGIT, PROB
    d3qe_tensor_pipeline/  ensemble: PIXELS → check_pixels → the same three parts → LOGIT, PROB
    evidence/              config.pbtxt, 1/model.py [, configs/native.pbtxt]   RESIDUAL, INDICES → the maps
    d3qe_evidence_pipeline/  ensemble: IMAGE → preprocess → the three parts ∥ evidence → LOGIT, PROB, INDICES,
                           ERROR_MAP, ATTENTION, REAL_FREQ, FAKE_FREQ
    d3qe/, d3qe_rgb/, d3qe_tensor/, d3qe_evidence/   config.pbtxt, 1/model.py   the admission gates clients call,
                           one per ensemble

Every tensor name, dtype and shape, the parts' and the entrances', is the wire contract's
(`d3qe_serve.contract`); this module adds only what the server does with them: the step that checks an
entrance's input first (`FIRST_STEPS`), batching, instances, queue policies. An entrance's ensemble runs
the parts its outputs need (`parts_run`): the evidence ensemble (written when the export has the
`evidence` part) shares the parts with the others, and plain scoring never runs the evidence part.

A gate's queue policy is where overload is refused (see `admission_config`); the ensembles and the
parts have none. `configs/native.pbtxt` (with `native=True`) is for NVIDIA's server container, which
has the native `onnxruntime_onnx`, `tensorrt_plan` and `openvino` backends: `tritonserver
--model-config-name=native` picks it up and falls back to `config.pbtxt` for the other models.
"""

from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path

import numpy as np
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format
from PIL import Image
from tritonclient.utils import serialize_byte_tensor

from d3qe_serve import contract
from d3qe_serve.contract import IMAGE, PART_NAMES, PIXELS, PROVENANCE, RGB, Signature, TensorSpec, triton_dtype
from d3qe_serve.d3qe.parts import sizes
from d3qe_serve.errors import ManifestError
from d3qe_serve.serving.manifest import Manifest, PartEntry
from d3qe_serve.serving.model_params import GateParameters, PartParameters, PreprocessParameters
from d3qe_serve.serving.operating_point import OperatingPoint

MODELS_PACKAGE = "d3qe_serve.model_repository"  # its modules are the python-backend models, shipped as package code
VERSION = "1"
NATIVE_CONFIG_NAME = "native"
NATIVE_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
NATIVE_BACKENDS = {"openvino": "openvino"}  # named by backend, not platform, in NVIDIA's container
# NVIDIA's OpenVINO backend has no parameter for an f32 precision hint (only HINT_BF16: YES), so on CPUs with
# AVX512-BF16 or AMX it computes an fp32 part in bf16, as OpenVINO does unless told otherwise.
OPENVINO_BACKEND_FP32_CAVEAT = (
    "# Built to compute in f32, but NVIDIA's openvino backend cannot ask OpenVINO for f32 (HINT_BF16 only): on a\n"
    "# CPU with AVX512-BF16 or AMX it computes in bf16 (VQ codes ~91 % equal). There, serve config.pbtxt.\n"
)
DEFAULT_QUEUE_DELAY_US = 2000  # a CPU batch takes ~1 s: waiting 2 ms for companions costs nothing
WARMUP_IMAGE = "image"
DEFAULT_MAX_QUEUE_SIZE = 64  # requests waiting at a gate; one more is refused at once
DEFAULT_QUEUE_TIMEOUT_S = 120.0  # the client's default timeout: after that nobody waits for the answer
DEFAULT_ADMITTED_BATCHES = 2  # batches in an ensemble at once per gate: one computing while the next is decoded
CHECKED = "CHECKED"  # check_pixels' output: the client's PIXELS, checked (inside the ensemble only)
# The model that checks an entrance's input before the parts run, by that input, and the tensor it hands them.
FIRST_STEPS = {IMAGE: ("preprocess", PIXELS), RGB: ("preprocess_rgb", PIXELS), PIXELS: ("check_pixels", CHECKED)}


def ensemble_name(entrance: str) -> str:
    """The ensemble behind an entrance's gate."""
    return f"{entrance}_pipeline"


def _data_type(dtype: str) -> int:
    """A config's data type (its TYPE_STRING is the protocol's BYTES)."""
    return mc.DataType.Value("TYPE_" + triton_dtype(dtype).replace("BYTES", "STRING"))


def _add_tensors(fields, specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> None:
    for t in specs:
        fields.add(name=t.name, data_type=_data_type(t.dtype), dims=t.dims)


def _preferred_batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 2
    while b <= max_batch:
        sizes.append(b)
        b *= 2
    return sizes or [1]


def _batching(config: mc.ModelConfig, max_batch: int, queue_delay_us: int) -> None:
    config.max_batch_size = max_batch
    config.dynamic_batching.preferred_batch_size.extend(_preferred_batch_sizes(max_batch))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us


def _instances(config: mc.ModelConfig, device: str, count: int) -> None:
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "cuda" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=count)


def default_threads(instances: int) -> int:
    """Intra-op threads per part instance: vq_encoder and clip_visual run side by side, `instances` each."""
    return max(1, len(os.sched_getaffinity(0)) // (2 * instances))


def default_decoders(device: str) -> int:
    """Instances of each decoding model (preprocess, preprocess_rgb), each a process of its own: one where the
    parts run on the CPU and need its cores; half the cores where they run on a GPU and decoding is the CPU's
    work (about 5 ms an image a core: one instance would hold a GPU to ~200 images/s)."""
    return max(1, len(os.sched_getaffinity(0)) // 2) if device == "cuda" else 1


def _parameters(config: mc.ModelConfig, params: dict[str, str]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = value


def part_config(
    part: Signature,
    entry: PartEntry,
    *,
    device: str,
    instances: int,
    threads: int,
    queue_delay_us: int,
    compile: bool = False,
) -> mc.ModelConfig:
    """The python-backend model hosting one exported part (`entry`: the part's manifest record)."""
    config = mc.ModelConfig(name=part.name, backend="python")
    _batching(config, entry.max_batch, queue_delay_us)
    _add_tensors(config.input, part.inputs)
    _add_tensors(config.output, part.outputs)
    _instances(config, device, instances)
    _parameters(config, PartParameters(part.name, threads, compile).to_parameters())
    if device == "cuda":  # a GPU step's output reaches the next GPU step as it is (DLPack), not via the host
        config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    for t in part.inputs:
        warmup.inputs[t.name].data_type = _data_type(t.dtype)
        warmup.inputs[t.name].dims.extend(t.dims)
        warmup.inputs[t.name].zero_data = True
    return config


def openvino_backend_parameters(entry: PartEntry, threads: int) -> dict[str, str]:
    """The parameters of NVIDIA's OpenVINO backend (triton-inference-server/openvino_backend README) for a part:
    one stream per instance at the latency hint with the instance's threads, as `OpenVinoRunner` compiles it;
    bf16 hinted where the part is built for it. The backend compiles the model for exactly max_batch_size
    images and refuses other batch sizes unless it pads them (ENABLE_BATCH_PADDING)."""
    params = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "ENABLE_BATCH_PADDING": "YES",
    }
    if entry.inference_precision == "bf16":
        params["HINT_BF16"] = "YES"
    return params


def native_config(
    part: Signature, entry: PartEntry, *, device: str, instances: int, threads: int, queue_delay_us: int
) -> mc.ModelConfig:
    """The same part on NVIDIA's native ONNX Runtime / TensorRT / OpenVINO backend (not runnable with the
    pytriton wheel)."""
    config = mc.ModelConfig(name=part.name, default_model_filename=Path(entry.file).name)
    if entry.runtime in NATIVE_BACKENDS:
        config.backend = NATIVE_BACKENDS[entry.runtime]
    else:
        config.platform = NATIVE_PLATFORMS[entry.runtime]
    _batching(config, entry.max_batch, queue_delay_us)
    _add_tensors(config.input, part.inputs)
    _add_tensors(config.output, part.outputs)
    _instances(config, device, instances)
    if entry.runtime == "onnxruntime":
        config.parameters["intra_op_thread_count"].string_value = str(threads)
    if entry.runtime == "openvino":
        _parameters(config, openvino_backend_parameters(entry, threads))
    return config


def parts_run(entrance: Signature, parts: dict[str, Signature]) -> list[str]:
    """The parts an entrance's ensemble runs, in `parts`' order: each part whose outputs the entrance gives or a
    later part takes."""
    needed, run = set(entrance.output_names), []
    for name in reversed(parts):
        if needed & set(parts[name].output_names):
            run.insert(0, name)
            needed |= set(parts[name].input_names)
    return run


def preprocess_config(
    entrance: Signature, pixels: TensorSpec, max_batch: int, queue_delay_us: int, instances: int = 1
) -> mc.ModelConfig:
    """Encoded files (IMAGE) or decoded pixels (RGB) → PIXELS, each warmed up with an image of its kind."""
    model, _ = FIRST_STEPS[entrance.input.name]
    config = mc.ModelConfig(name=model, backend="python")
    _batching(config, max_batch, queue_delay_us)
    _add_tensors(config.input, entrance.inputs)
    _add_tensors(config.output, [pixels])
    _instances(config, "cpu", instances)
    _parameters(config, PreprocessParameters(entrance.input.name).to_parameters())
    warmup = config.model_warmup.add(name="image", batch_size=1)
    tensor = warmup.inputs[entrance.input.name]
    tensor.data_type = _data_type(entrance.input.dtype)
    if entrance.input.name == IMAGE:
        tensor.dims.extend(entrance.input.dims)
        tensor.input_data_file = WARMUP_IMAGE
    else:  # a black image of the model's size: valid pixels of every size the transform handles
        channels, height, width = pixels.dims
        tensor.dims.extend([height, width, channels])
        tensor.zero_data = True
    return config


def check_pixels_config(max_batch: int, pixels: TensorSpec, queue_delay_us: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=FIRST_STEPS[PIXELS][0], backend="python")
    _batching(config, max_batch, queue_delay_us)
    _add_tensors(config.input, [pixels])
    _add_tensors(config.output, [pixels.renamed(CHECKED)])
    _instances(config, "cpu", 1)
    return config


def ensemble_config(entrance: Signature, parts: dict[str, Signature], max_batch: int) -> mc.ModelConfig:
    """The entrance's first step (preprocess, preprocess_rgb or check_pixels), then the parts its outputs need:
    vq_encoder ∥ clip_visual → d3qe_head (∥ evidence)."""
    config = mc.ModelConfig(name=ensemble_name(entrance.name), platform="ensemble", max_batch_size=max_batch)
    _add_tensors(config.input, entrance.inputs)
    _add_tensors(config.output, [t for t in entrance.outputs if t.name not in PROVENANCE])  # the gate adds these
    first, handed_on = FIRST_STEPS[entrance.input.name]
    step = config.ensemble_scheduling.step.add(model_name=first, model_version=-1)
    step.input_map[entrance.input.name] = entrance.input.name
    step.output_map[handed_on] = "pixels"  # ensemble-internal name; the ensemble's own input may be PIXELS
    for part in parts_run(entrance, parts):
        step = config.ensemble_scheduling.step.add(model_name=part, model_version=-1)
        for t in parts[part].inputs:
            step.input_map[t.name] = "pixels" if t.name == PIXELS else t.name
        for t in parts[part].outputs:
            step.output_map[t.name] = t.name
    return config


def admission_config(
    entrance: Signature,
    ensemble: mc.ModelConfig,
    *,
    max_queue_size: int,
    queue_timeout_s: float,
    batches: int,
    manifest_id: str | None = None,
    threshold: float | None = None,
    cache: bool = True,
) -> mc.ModelConfig:
    """The gate in front of `ensemble`: the entrance's tensors (the ensemble's, and the provenance the gate adds:
    `manifest_id`, `threshold`); its dynamic batcher's queue policy refuses the excess.

    `cache`: Triton's response cache answers a request equal to one answered before (the same model version
    and input bytes) without running anything, where the server has a cache (`d3qe serve --cache-mb`); a
    rollout gives the gate a new version, so that no answer outlives its model (`serving.rollout`).

    Up to `batches` batches (of up to max_batch_size images) are inside the ensemble at a time; up to
    `max_queue_size` requests wait; more are refused at once (UNAVAILABLE, "Exceeds maximum queue size"),
    as are requests that waited `queue_timeout_s` (0: no limit) or the shorter timeout a client asked for.
    Refusing here, before the ensemble, is deliberate: Triton 2.51 loses requests refused by a queue
    policy on a step inside it (seen here: with max_queue_size on vq_encoder and clip_visual, 38 of 48
    requests of a burst were never answered; refused by a queue timeout at one of the two parallel steps
    while the other runs, a request is answered but stays in flight, blocking shutdown). On the first step
    alone a policy is safe but useless: decoding is fast, the backlog builds up in front of the parts.
    """
    if max_queue_size < 1 or batches < 1 or queue_timeout_s < 0:
        raise ValueError(
            f"need max_queue_size >= 1, batches >= 1, queue_timeout_s >= 0; got {max_queue_size}, {batches}, "
            f"{queue_timeout_s}"
        )
    config = mc.ModelConfig(name=entrance.name, backend="python", max_batch_size=ensemble.max_batch_size)
    _add_tensors(config.input, entrance.inputs)
    _add_tensors(config.output, entrance.outputs)
    policy = config.dynamic_batching.default_queue_policy  # no queue delay: an admitted batch leaves at once
    policy.max_queue_size = max_queue_size
    policy.default_timeout_microseconds = round(queue_timeout_s * 1e6)
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True  # a client may ask to be refused sooner, never later
    _instances(config, "cpu", batches)
    _parameters(config, GateParameters(ensemble.name, manifest_id, threshold).to_parameters())
    config.response_cache.enable = cache
    return config


def gradient_png(size: int) -> bytes:
    """A PNG gradient of `size` × `size` pixels: the decoding models' warm-up image, a rollout's probe."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgb.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def warmup_image(size: int) -> bytes:
    """A PNG gradient as a serialized TYPE_STRING tensor of one element (Triton's warm-up file format)."""
    return serialize_byte_tensor(np.array([gradient_png(size)], dtype=np.object_)).item()


def write_config(path: Path, config: mc.ModelConfig, comment: str = "") -> Path:
    """`config` in protobuf text format at `path` (a model's `config.pbtxt`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + text_format.MessageToString(config))
    return path


def read_config(path: Path) -> mc.ModelConfig:
    """A `config.pbtxt` as tritonclient's `ModelConfig` (ManifestError where it is not one)."""
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise ManifestError(f"{path}: not a Triton model config ({e})") from e



def model_module(config: mc.ModelConfig) -> str:
    """The module of `model_repository/` a python-backend model runs, by what its config says it is."""
    params = config.parameters
    if "part" in params:
        return "part"
    if "ensemble" in params:
        return "admission"
    if "input" in params:
        return "preprocess"
    if config.name.startswith(FIRST_STEPS[PIXELS][0]):
        return "check_pixels"
    raise ManifestError(f"model {config.name!r}: not one of the python-backend models this version writes")


def install_model(module: str, model_dir: Path, version: int | str = VERSION) -> Path:
    """`model_repository/<module>.py` as the model's `<version>/model.py` (read as package data: it runs only in
    Triton)."""
    dest = model_dir / str(version) / "model.py"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((resources.files(MODELS_PACKAGE) / f"{module}.py").read_bytes())
    return dest



def _write_first_step(
    folder: Path, entrance: Signature, pixels: TensorSpec, *, max_batch: int, queue_delay_us: int, instances: int
) -> list[Path]:
    """The model that checks an entrance's input: `check_pixels`, or a decoding model (with its warm-up image)."""
    model, _ = FIRST_STEPS[entrance.input.name]
    if entrance.input.name == PIXELS:
        config = check_pixels_config(max_batch, pixels, queue_delay_us)
        return [write_config(folder / "config.pbtxt", config), install_model(model, folder)]
    config = preprocess_config(entrance, pixels, max_batch, queue_delay_us, instances)
    written = [write_config(folder / "config.pbtxt", config), install_model("preprocess", folder)]
    if entrance.input.name == IMAGE:
        (folder / "warmup").mkdir(exist_ok=True)
        (folder / "warmup" / WARMUP_IMAGE).write_bytes(warmup_image(pixels.dims[-1]))
        written.append(folder / "warmup" / WARMUP_IMAGE)
    return written


def write_repository(
    out_dir: Path,
    manifest: Manifest,
    *,
    native: bool = False,
    device: str = "cpu",
    instances: int = 1,
    threads: int | None = None,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
    admitted_batches: int = DEFAULT_ADMITTED_BATCHES,
    compile: bool = False,
    decoders: int | None = None,
    cache: bool = True,
) -> list[Path]:
    """Write every config, python model, ensemble and gate for the parts `manifest` describes; returns the files.

    `device` ("cpu" or "cuda") is where the parts run, `instances` of each; `threads` is the
    intra-op thread count of each instance (default: the cores split between vq_encoder and clip_visual).
    `max_queue_size`, `queue_timeout_s` and `admitted_batches` are each gate's overload policy
    (`admission_config`). `compile`: the torch-runtime parts run compiled (`serving.runtimes.TorchRunner`).
    `decoders`: instances of each decoding model (default `default_decoders(device)`). The gates answer with
    the manifest's id and the threshold of the export's operating point (`operating_point.json` in `out_dir`,
    upstream's 0.5 without one); `cache`: their answers may come from Triton's response cache.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    out_dir = Path(out_dir)
    shapes = sizes(manifest.d3qe_config())
    served = contract.parts(shapes)
    entries = {part: manifest.parts[part] for part in served if part in manifest.parts}  # older exports: no evidence
    _check_parts(out_dir, served, entries)
    threads = threads or default_threads(instances)
    max_batch = min(e.max_batch for e in entries.values())
    options = {"device": device, "instances": instances, "threads": threads, "queue_delay_us": queue_delay_us}
    written = []
    if compile and (eager := sorted(p for p, e in entries.items() if e.runtime != "torch")):
        raise ValueError(f"compile applies to torch-runtime parts; {', '.join(eager)} are not")
    for part, entry in entries.items():
        config = part_config(served[part], entry, **options, compile=compile)
        written.append(write_config(out_dir / part / "config.pbtxt", config))
        written.append(install_model("part", out_dir / part))
        native_path = out_dir / part / "configs" / f"{NATIVE_CONFIG_NAME}.pbtxt"
        if native and (entry.runtime in NATIVE_PLATFORMS or entry.runtime in NATIVE_BACKENDS):
            caveat = OPENVINO_BACKEND_FP32_CAVEAT if entry.inference_precision == "f32" else ""
            written.append(write_config(native_path, native_config(served[part], entry, **options), caveat))
        else:
            native_path.unlink(missing_ok=True)  # from an earlier export: it would not match these artifacts
    pixels = contract.tensors(shapes)[PIXELS]
    policy = {"max_queue_size": max_queue_size, "queue_timeout_s": queue_timeout_s, "batches": admitted_batches}
    provenance = {"manifest_id": manifest.id, "threshold": OperatingPoint.read(out_dir).threshold, "cache": cache}
    step = {"max_batch": max_batch, "queue_delay_us": queue_delay_us, "instances": decoders or default_decoders(device)}
    firsts = set()  # entrances may share their first step (d3qe_evidence decodes with d3qe's preprocess)
    for entrance in contract.entrances(shapes).values():
        if not set(parts_run(entrance, served)) <= entries.keys():
            continue  # an export without the evidence part has no evidence entrance
        first, _ = FIRST_STEPS[entrance.input.name]
        if first not in firsts:
            firsts.add(first)
            written += _write_first_step(out_dir / first, entrance, pixels, **step)
        ensemble = ensemble_config(entrance, served, max_batch)
        written.append(write_config(out_dir / ensemble.name / "config.pbtxt", ensemble))
        (out_dir / ensemble.name / VERSION).mkdir(exist_ok=True)  # an ensemble needs a version folder, even empty
        gate = admission_config(entrance, ensemble, **provenance, **policy)
        written.append(write_config(out_dir / entrance.name / "config.pbtxt", gate))
        written.append(install_model("admission", out_dir / entrance.name))
    return written


def check_parts(out_dir: Path, manifest: Manifest) -> None:
    """The manifest's parts are the scoring parts, each exported with the contract's tensors (ManifestError)."""
    served = contract.parts(sizes(manifest.d3qe_config()))
    _check_parts(out_dir, served, {p: manifest.parts[p] for p in served if p in manifest.parts})


def _check_parts(out_dir: Path, served: dict[str, Signature], entries: dict[str, PartEntry]) -> None:
    """Every scoring part is exported, each artifact taking and giving the contract's tensors."""
    missing = [p for p in PART_NAMES if p not in entries]
    if missing:
        raise ManifestError(f"{out_dir}: the manifest has no {', '.join(missing)}: export the parts first")
    for part, entry in entries.items():
        if (tuple(entry.inputs), tuple(entry.outputs)) != (served[part].inputs, served[part].outputs):
            raise ManifestError(
                f"{out_dir}: {part} was exported with tensors {entry.input_names} → {entry.output_names} of other "
                f"dtypes or shapes than this version serves: export again"
            )
