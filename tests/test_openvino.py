"""OpenVINO as a runtime of the parts, static int8 on both CPU runtimes, and per-part plans, on the tiny fixture.

Truth is the fixture's upstream logits (fp32, within 1e-4), the eager model, and a real tritonserver.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format
from tritonclient.utils import triton_to_np_dtype

from d3qe_serve import d3qe
from d3qe_serve.cli.main import main
from d3qe_serve.contract import CLIP_FEAT, PIXELS
from d3qe_serve.d3qe.parts import PART_NAMES, part_specs
from d3qe_serve.errors import UnsupportedError
from d3qe_serve.export.calibration import calibration_set
from d3qe_serve.export.driver import build_part, check_choice, export_repository
from d3qe_serve.export.plan import PartChoice, uniform_choice
from d3qe_serve.export.validate import POOL, TOLERANCES, validation_pixels
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.host import openvino_capabilities, openvino_precision_problem
from d3qe_serve.serving.inprocess import run_parts
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.runtimes import OnnxRuntimeRunner, OpenVinoRunner, load_part
from d3qe_serve.serving.server import TritonServer
from tests.helpers import LOGIT_TOL, image_input

BACKEND_PARAMETERS = {"PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "ENABLE_BATCH_PADDING", "HINT_BF16"}


@pytest.fixture(scope="module")
def ov_repo(tiny_checkpoint, tmp_path_factory) -> Path:
    """`d3qe export --runtime openvino` of the fixture, with the native configs."""
    out = tmp_path_factory.mktemp("openvino") / "repo"
    argv = ["export", "--checkpoint", str(tiny_checkpoint), "--runtime", "openvino", "--out", str(out)]
    assert main([*argv, "--max-batch", "4", "--native-configs"]) == 0
    return out


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return d3qe.load_detector(tiny_checkpoint)


@pytest.fixture(scope="module")
def calibration():
    """Eight corpus images away from the export's validation pool (the first `POOL` items of `corpus(POOL)`)."""
    from d3qe_serve.export.corpus import corpus

    return calibration_set(8, exclude=[item.name for item in corpus(POOL)])


def served_logits(repo: Path, images: list[bytes], log_dir: Path) -> np.ndarray:
    """The logits a real tritonserver serving `repo` gives for these image files, one request each."""
    with (
        (log_dir / "server.log").open("w") as log,
        TritonServer(repo, free_endpoints(), log=log) as server,
        grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client,
    ):
        return np.concatenate([client.infer("d3qe", [image_input([b])]).as_numpy("LOGIT") for b in images])


def test_openvino_export_computes_fp32_as_asked(ov_repo):
    """Every part validated, and compiled with an explicit f32 hint (OpenVINO would pick bf16 on such CPUs)."""
    manifest = Manifest.read(ov_repo)
    assert manifest.passed and manifest.describe() == ("openvino", "fp32")
    for part, entry in manifest.parts.items():
        assert entry.inference_precision == "f32" and entry.file == f"{part}/1/model.onnx"
        runner = load_part(ov_repo, part, threads=1)
        assert isinstance(runner, OpenVinoRunner)
        assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert runner.compiled.get_property("NUM_STREAMS") == 1


@pytest.mark.server
@pytest.mark.slow
def test_openvino_served_scores_equal_eager(ov_repo, fixture_images, expected, tmp_path):
    logits = served_logits(ov_repo, [p.read_bytes() for p in fixture_images], tmp_path)
    assert np.abs(logits - expected["image_logits_reference"]).max() < LOGIT_TOL


def check_native_openvino_config(repo: Path, part: str) -> None:
    """NVIDIA's openvino backend: its parameters only, the precision said, and the tensors it checks against
    the model it reads (`ModelState::ValidateInputs/Outputs`: names, element types, dims after the batch axis)."""
    entry = Manifest.read(repo).parts[part]
    text = (repo / part / "configs" / "native.pbtxt").read_text()
    # the backend cannot ask for f32: said in the file; bf16 is asked for with HINT_BF16
    assert text.startswith("# Built to compute in f32") == (entry.inference_precision == "f32")
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.backend == "openvino" and not config.platform
    assert config.default_model_filename == Path(entry.file).name
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params.keys() <= BACKEND_PARAMETERS
    assert params["PERFORMANCE_HINT"] == "LATENCY" and params["NUM_STREAMS"] == "1"
    assert params["INFERENCE_NUM_THREADS"].isdigit() and params["ENABLE_BATCH_PADDING"] == "YES"
    assert ("HINT_BF16" in params) == (entry.inference_precision == "bf16")
    model = ov.Core().read_model(repo / entry.file)
    for declared, actual in ((config.input, model.inputs), (config.output, model.outputs)):
        ports = {p.get_any_name(): p for p in actual}
        assert {t.name for t in declared} == set(ports)
        for t in declared:
            port = ports[t.name]
            want = np.dtype(port.get_element_type().to_dtype())
            assert triton_to_np_dtype(mc.DataType.Name(t.data_type).removeprefix("TYPE_")) == want
            shape = port.get_partial_shape()
            assert shape[0].is_dynamic, f"{part}.{t.name}: the batch axis must be dynamic"
            assert [d.get_length() for d in list(shape)[1:]] == list(t.dims)


def test_native_openvino_configs_match_the_models(ov_repo):
    for part in (*PART_NAMES, "evidence"):
        check_native_openvino_config(ov_repo, part)


def test_bf16_only_where_the_cpu_computes_it():
    assert openvino_precision_problem("bf16", ("FP32", "BF16", "INT8")) is None
    problem = openvino_precision_problem("bf16", ("FP32", "INT8", "BIN"))
    assert problem and "does not compute bfloat16 natively" in problem and "AVX512-BF16 or AMX" in problem
    assert openvino_precision_problem("int8-bf16", ("FP32", "INT8", "BIN")) == problem
    assert openvino_precision_problem("int8", ("FP32", "INT8")) is None
    # on this machine: allowed exactly where its OpenVINO reports BF16
    if "BF16" in openvino_capabilities():
        check_choice(PartChoice("openvino", "bf16"), "cpu")
    else:
        with pytest.raises(UnsupportedError, match="does not compute bfloat16 natively"):
            check_choice(PartChoice("openvino", "bf16"), "cpu")


def test_unoffered_choices_say_why():
    for runtime, precision, why in (
        ("openvino", "fp16", "fp32, bf16"),
        ("openvino", "int8-dynamic", "dynamic int8 is ONNX Runtime's"),
        ("onnxruntime", "int8-bf16", "no bfloat16 kernels"),
        ("torch", "int8", "torch runtime runs fp32, fp16 or bf16"),
    ):
        with pytest.raises(UnsupportedError, match=why):
            check_choice(PartChoice(runtime, precision))
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        PartChoice("openvino", "int4")


def test_uniform_int8_is_dynamic_on_onnxruntime_static_on_openvino():
    specs = part_specs(d3qe.PRESETS["tiny"])
    assert uniform_choice(specs["clip_visual"], "onnxruntime", "int8") == PartChoice("onnxruntime", "int8-dynamic")
    assert uniform_choice(specs["clip_visual"], "openvino", "int8") == PartChoice("openvino", "int8")
    assert uniform_choice(specs["vq_encoder"], "openvino", "int8") == PartChoice("openvino", "fp32")
    assert uniform_choice(specs["evidence"], "openvino", "bf16") == PartChoice("openvino", "fp32")


def test_calibration_is_held_apart_and_recorded(calibration):
    from d3qe_serve.export.corpus import corpus

    everything = corpus()
    assert len(calibration) == 8 and calibration.pixels.shape == (8, 3, 256, 256)
    assert [everything[i].name for i in calibration.indices] == list(calibration.names)
    assert not set(calibration.names) & {item.name for item in corpus(POOL)}
    assert calibration.record()["indices"] == list(calibration.indices)
    again = calibration_set(8, exclude=[f"corpus:{item.name}" for item in corpus(POOL)])  # as manifests name them
    assert again.indices == calibration.indices and again.digest == calibration.digest


BF16 = pytest.mark.skipif("BF16" not in openvino_capabilities(), reason="this CPU does not compute bf16 natively")


@pytest.mark.parametrize(
    ("choice", "runner", "hint"),
    [
        (PartChoice("openvino", "int8"), OpenVinoRunner, "f32"),
        pytest.param(PartChoice("openvino", "int8-bf16"), OpenVinoRunner, "bf16", marks=BF16),
        (PartChoice("onnxruntime", "int8"), OnnxRuntimeRunner, None),
    ],
    ids=str,
)
def test_static_int8_builds_and_computes_in_int8(model, calibration, choice, runner, hint, tmp_path):
    """NNCF (OpenVINO) and ORT quantize_static (QDQ) on CLIP's tower, calibrated on the held-apart images."""
    spec = part_specs(model.cfg)["clip_visual"]
    entry = build_part(spec, model, tmp_path, choice, max_batch=4, calibration=calibration)
    assert (entry.precision, entry.quantization, entry.quantization_kind) == ("int8", "static", "static")
    assert entry.calibration["indices"] == list(calibration.indices) and entry.validation == {}
    assert entry.inference_precision == hint
    path = tmp_path / entry.file
    if choice.runtime == "openvino":  # NNCF's IR: fake-quantise nodes, the weights in the .bin beside it
        assert entry.file == "clip_visual/1/model.xml" and list(entry.extra_files) == ["clip_visual/1/model.bin"]
        assert any(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(path).get_ops())
    else:
        assert entry.file == "clip_visual/1/model.onnx" and entry.extra_files is None
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)
    part = runner("clip_visual", entry, path)
    if choice.runtime == "openvino":  # int8 kernels, not fake quantisation in fp32; the rest as hinted
        ops = part.compiled.get_runtime_model().get_ops()
        precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in ops}
        assert {"u8", "i8"} & precisions and (hint == "bf16") == ("bf16" in precisions), precisions
    pixels = validation_pixels(())[0][:4]  # judged on images held apart from those it was calibrated on
    with torch.inference_mode():
        want = model.clip_model(pixels).numpy()
    got = part({PIXELS: pixels.numpy()})[CLIP_FEAT]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99 and np.abs(got - want).max() <= TOLERANCES["int8"].max_abs[CLIP_FEAT]
    assert np.abs(got - want).max() > 1e-4  # it did quantise


def test_static_int8_needs_a_calibration_set(model, tmp_path):
    spec = part_specs(model.cfg)["clip_visual"]
    with pytest.raises(ValueError, match="static int8 needs a calibration set"):
        build_part(spec, model, tmp_path, PartChoice("onnxruntime", "int8"), max_batch=2)


def test_calibration_sharing_validation_images_is_refused(model, tmp_path):
    from d3qe_serve.export.corpus import corpus

    validated = corpus(POOL)[0].name
    pool = calibration_set(1, exclude=[item.name for item in corpus() if item.name != validated])
    plan = {"clip_visual": PartChoice("onnxruntime", "int8")}
    with pytest.raises(ValueError, match=r"calibration images .* are in the validation pool"):
        export_repository(model, tmp_path / "repo", plan=plan, calibration=pool, max_batch=2, log=lambda _: None)


@pytest.mark.server
@pytest.mark.slow
def test_mixed_plan_exports_validates_and_serves(model, calibration, fixture_images, expected, tmp_path):
    """VQ encoder on OpenVINO fp32, CLIP on OpenVINO static int8 (IR), the head on ONNX Runtime: validated, and
    served as run in-process."""
    plan = {"vq_encoder": PartChoice("openvino", "fp32"), "clip_visual": PartChoice("openvino", "int8")}
    repo = tmp_path / "repo"
    manifest = export_repository(model, repo, plan=plan, calibration=calibration, max_batch=4, log=lambda _: None)
    assert manifest.passed and manifest.describe() == (
        "openvino/openvino/onnxruntime/onnxruntime",
        "fp32/int8/fp32/fp32",
    )
    assert manifest.precision == "int8"  # the widest tolerance of its parts: what the demo and benchmarks read
    record = json.loads((repo / "manifest.json").read_text())["parts"]["clip_visual"]
    assert record["quantization"] == "static" and record["calibration"]["indices"] == list(calibration.indices)
    pixels = torch.stack([d3qe.preprocess(p) for p in fixture_images]).numpy()
    runners = {p: load_part(repo, p) for p in PART_NAMES}
    in_process = np.concatenate([run_parts(runners, pixels[i : i + 4])["LOGIT"] for i in range(0, len(pixels), 4)])
    served = served_logits(repo, [p.read_bytes() for p in fixture_images], tmp_path)
    np.testing.assert_allclose(served, in_process, rtol=0, atol=1e-5)
    assert np.abs(served - expected["image_logits_reference"]).max() <= TOLERANCES["int8"].max_abs["LOGIT"]
    write_repository(repo, manifest, native=True)  # the IR, for NVIDIA's openvino backend
    for part in ("vq_encoder", "clip_visual"):
        check_native_openvino_config(repo, part)
    with (repo / "clip_visual" / "1" / "model.bin").open("ab") as f:  # the IR's weights are checked too
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"clip_visual: .*model.bin is not the file exported"):
        load_part(repo, "clip_visual")
