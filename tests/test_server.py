"""The Triton ensemble on a real tritonserver (the nvidia-pytriton wheel's), serving the exported fixture.

Truth is the fixture: upstream's own logits for its images and tensors (fp32, within 1e-4).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.d3qe.parts import PART_NAMES as PARTS
from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.server import TritonServer
from tests.helpers import LOGIT_TOL, copy_models, image_input, pixels_input, png_header_only

pytestmark = [pytest.mark.server, pytest.mark.slow]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def client(tiny_server):
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def fixture_bytes(fixture_images, expected) -> list[tuple[bytes, float]]:
    return [
        (p.read_bytes(), float(v))
        for p, v in zip(fixture_images, expected["image_logits_reference"][:, 0], strict=True)
    ]


def batch_sizes(client, model: str) -> dict[int, int]:
    """Executions per batch size the model has run so far."""
    stats = client.get_inference_statistics(model).model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


SCORING_MODELS = {
    *("preprocess", "preprocess_rgb", "check_pixels", "vq_encoder", "clip_visual", "d3qe_head"),
    *("d3qe_pipeline", "d3qe_rgb_pipeline", "d3qe_tensor_pipeline", "d3qe", "d3qe_rgb", "d3qe_tensor"),
}


def test_repository_layout(tiny_repository):
    models = {p.parent.name for p in tiny_repository.glob("*/config.pbtxt")}
    assert models == {*SCORING_MODELS, "evidence", "d3qe_evidence_pipeline", "d3qe_evidence"}
    for part in (*PARTS, "evidence"):
        assert (tiny_repository / part / "1" / "model.onnx").is_file()
        assert (tiny_repository / part / "1" / "model.py").is_file()


def test_an_export_without_the_evidence_part_still_gets_every_scoring_model(tiny_repository, tmp_path):
    manifest = Manifest.read(tiny_repository)
    del manifest.parts["evidence"]
    write_repository(tmp_path, manifest)
    assert {p.parent.name for p in tmp_path.glob("*/config.pbtxt")} == SCORING_MODELS


def test_images_through_d3qe_match_the_fixture(client, fixture_bytes):
    # all images in one request, then each image as its own request (the server batches them)
    result = client.infer("d3qe", [image_input([b for b, _ in fixture_bytes])])
    logits, probs = result.as_numpy("LOGIT"), result.as_numpy("PROB")
    want = np.array([v for _, v in fixture_bytes], dtype=np.float32)[:, None]
    assert logits.shape == probs.shape == (len(fixture_bytes), 1)
    assert np.abs(logits - want).max() < LOGIT_TOL
    assert np.abs(probs - sigmoid(logits)).max() < 1e-6
    with ThreadPoolExecutor(len(fixture_bytes)) as pool:
        singles = list(pool.map(lambda b: client.infer("d3qe", [image_input([b[0]])]).as_numpy("LOGIT"), fixture_bytes))
    assert np.abs(np.concatenate(singles) - want).max() < LOGIT_TOL


def test_tensors_through_d3qe_tensor_match_the_fixture(client, expected):
    result = client.infer("d3qe_tensor", [pixels_input(expected["x"])])
    assert np.abs(result.as_numpy("LOGIT") - expected["x_logits_reference"]).max() < LOGIT_TOL
    assert np.abs(result.as_numpy("PROB") - sigmoid(result.as_numpy("LOGIT"))).max() < 1e-6
    # the fixture images' exact preprocessed tensors give the images' logits
    pixels = expected["image_tensors_u8"].astype(np.float32) / 255
    result = client.infer("d3qe_tensor", [pixels_input(pixels)])
    assert np.abs(result.as_numpy("LOGIT") - expected["image_logits_reference"]).max() < LOGIT_TOL


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x: np.where(x > 0.5, np.nan, x), "NaN or infinity"),
        (lambda x: x * 255, r"must lie in \[0, 1\].*got values in \[0\.\d+, 25\d\."),
        (lambda x: x * 2 - 1, r"must lie in \[0, 1\].*got values in \[-0\.99\d*, 0\.99"),
    ],
    ids=["nan", "0-255", "minus1-1"],
)
def test_bad_tensors_get_a_clear_error(client, expected, change, match):
    with pytest.raises(InferenceServerException, match=match) as e:
        client.infer("d3qe_tensor", [pixels_input(change(expected["x"][:1]).astype(np.float32))])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_wrong_dtype_or_shape_is_refused_by_the_server(client, expected):
    with pytest.raises(InferenceServerException, match="FP64"):
        t = grpcclient.InferInput("PIXELS", [1, 3, 256, 256], "FP64")
        t.set_data_from_numpy(expected["x"][:1].astype(np.float64))
        client.infer("d3qe_tensor", [t])
    with pytest.raises(InferenceServerException, match=r"unexpected shape.*\[1,3,224,224\]"):
        client.infer("d3qe_tensor", [pixels_input(expected["x"][:1, :, :224, :224].copy())])


def test_a_batch_mixing_good_and_corrupt_images(client, fixture_bytes, fixture_images):
    jpeg = next(p for p in fixture_images if p.suffix == ".jpg").read_bytes()
    bad = {
        "empty": (b"", "empty image"),
        "garbage": (b"not an image at all", "not a decodable image"),
        "truncated": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "bomb": (png_header_only(20000, 20000), "pixel limit|decompression bomb"),
    }
    # good and bad alternate: (bytes, expected logit) or (bytes, expected error message alternatives)
    sent: list[tuple[bytes, float | str]] = [
        x for pair in zip(fixture_bytes[: len(bad)], bad.values(), strict=True) for x in pair
    ]
    sent += fixture_bytes[len(bad) :]
    before = batch_sizes(client, "preprocess")
    # one request per image, all in flight at once: the dynamic batcher puts good and bad ones together
    done: list = [None] * len(sent)
    finished = threading.Semaphore(0)

    def callback(i, result, error):
        done[i] = error if error is not None else result.as_numpy("LOGIT")[0, 0]
        finished.release()

    for i, (data, _) in enumerate(sent):
        client.async_infer("d3qe", [image_input([data])], callback=functools.partial(callback, i))
    for _ in sent:
        assert finished.acquire(timeout=60)
    for (_, want), got in zip(sent, done, strict=True):
        if isinstance(want, str):
            assert isinstance(got, InferenceServerException) and got.status() == "StatusCode.INVALID_ARGUMENT"
            assert any(s in got.message() for s in want.split("|")), got.message()
        else:
            assert not isinstance(got, Exception), got
            assert abs(got - want) < LOGIT_TOL
    after = batch_sizes(client, "preprocess")
    grown = [size for size, count in after.items() if count > before.get(size, 0)]
    assert max(grown) > 1, f"no request was batched with another: {after}"


def test_a_bad_image_inside_a_multi_image_request_is_named(client, fixture_bytes):
    with pytest.raises(InferenceServerException, match=r"IMAGE\[1\]: not a decodable image"):
        client.infer("d3qe", [image_input([fixture_bytes[0][0], b"junk", fixture_bytes[1][0]])])


def test_concurrent_clients_all_answered(tiny_server, fixture_bytes):
    threads, per_thread = 8, 20

    def worker(k: int) -> list[float]:
        with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
            return [
                abs(c.infer("d3qe", [image_input([data])]).as_numpy("LOGIT")[0, 0] - want)
                for data, want in (fixture_bytes[(k + j) % len(fixture_bytes)] for j in range(per_thread))
            ]

    with ThreadPoolExecutor(threads) as pool:
        errors = [e for errs in pool.map(worker, range(threads)) for e in errs]
    assert len(errors) == threads * per_thread
    assert max(errors) < LOGIT_TOL


def _group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


def test_serve_command_starts_answers_and_stops_cleanly(tiny_repository, tmp_path, expected):
    # `check_pixels` alone (a python-backend model that loads in seconds) is enough to exercise the command
    repo = copy_models(tiny_repository, tmp_path / "repo", "check_pixels")
    e = free_endpoints()
    args = ["--model-repository", str(repo), "--grpc-port", str(e.grpc_port)]
    args += ["--http-port", str(e.http_port), "--metrics-port", str(e.metrics_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "d3qe_serve.cli.main", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        banner = [proc.stdout.readline() for _ in range(6)]
        assert banner[0].startswith("d3qe serve: Triton 2.") and "models check_pixels" in banner[0], banner
        assert f"gRPC        127.0.0.1:{e.grpc_port}" in "".join(banner)
        pid = int(banner[0].split("(pid ")[1].split(")")[0])
        with grpcclient.InferenceServerClient(e.grpc_url) as c:
            checked = c.infer("check_pixels", [pixels_input(expected["x"])]).as_numpy("CHECKED")
        np.testing.assert_array_equal(checked, expected["x"])
        assert _group_alive(pid)  # the server and its python-backend stub
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(pid), "tritonserver or a python stub outlived `d3qe serve`"


def test_serve_command_reports_why_it_cannot_start(tmp_path, tiny_server, capsys):
    assert main(["serve", "--model-repository", str(tmp_path / "nothing")]) == 1
    assert "does not exist: run `d3qe export` first" in capsys.readouterr().err
    port = tiny_server.endpoints.grpc_port
    assert main(["serve", "--model-repository", str(tiny_server.model_repository), "--grpc-port", str(port)]) == 1
    assert f"gRPC port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_a_model_that_fails_to_load_is_named(tiny_repository, tmp_path):
    repo = copy_models(tiny_repository, tmp_path / "repo", "vq_encoder")
    (repo / "vq_encoder" / "1" / "model.onnx").unlink()
    with pytest.raises(ServerError, match="exited with code 1 while starting:(.|\n)*vq_encoder(.|\n)*is missing"):
        TritonServer(repo, free_endpoints(), startup_timeout=120).start()


def test_a_torch_runtime_repository_serves_the_fixture(tiny_checkpoint, fixture_bytes, tmp_path):
    """The torch runtime's VQ residual is a permuted view: it must leave the part contiguous (DLPack)."""
    repo = tmp_path / "torch_repository"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--runtime", "torch", "--out", str(repo)]) == 0
    with TritonServer(repo, free_endpoints()) as server, D3QEClient(server.endpoints.grpc_url) as client:
        results = list(client.score((str(i), b) for i, (b, _) in enumerate(fixture_bytes)))
    assert all(r.ok for r in results), [r.error for r in results]
    np.testing.assert_allclose([r.logit for r in results], [v for _, v in fixture_bytes], rtol=0, atol=LOGIT_TOL)


def test_configs_are_valid_model_config_protobufs(tiny_repository):
    for path in [*tiny_repository.glob("*/config.pbtxt"), *tiny_repository.glob("*/configs/*.pbtxt")]:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())  # unknown fields raise
        assert config.name == path.parent.name or config.name == path.parent.parent.name


def test_dynamic_batching_and_warmup_configured(tiny_repository):
    for model in ("preprocess", "check_pixels", "vq_encoder", "clip_visual", "d3qe_head"):
        config = text_format.Parse((tiny_repository / model / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.max_batch_size >= 2 and config.dynamic_batching.max_queue_delay_microseconds > 0
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        if model not in ("check_pixels",):
            assert config.model_warmup, model


def test_gpu_parts_take_gpu_inputs_as_they_are(tiny_repository, tmp_path):
    """On a GPU the python backend would copy every input to the host unless told otherwise."""
    write_repository(tmp_path, Manifest.read(tiny_repository), device="cuda")
    for model in ("vq_encoder", "clip_visual", "d3qe_head"):
        config = text_format.Parse((tmp_path / model / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    cpu = text_format.Parse((tiny_repository / "vq_encoder" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu.parameters
    # decoding is the CPU's whole job there: half its cores decode, one instance of each decoding model on a CPU
    for model in ("preprocess", "preprocess_rgb"):
        gpu = text_format.Parse((tmp_path / model / "config.pbtxt").read_text(), mc.ModelConfig())
        cpu = text_format.Parse((tiny_repository / model / "config.pbtxt").read_text(), mc.ModelConfig())
        assert gpu.instance_group[0].count == max(1, len(os.sched_getaffinity(0)) // 2)
        assert cpu.instance_group[0].count == 1
    write_repository(tmp_path, Manifest.read(tiny_repository), device="cuda", decoders=3)
    for model in ("preprocess", "preprocess_rgb"):
        config = text_format.Parse((tmp_path / model / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.instance_group[0].count == 3


@pytest.fixture(scope="module")
def native_repository(tiny_repository, tmp_path_factory) -> Path:
    """The tiny export's parts with `write_repository(..., native=True)`: configs/native.pbtxt beside each."""
    repo = copy_models(tiny_repository, tmp_path_factory.mktemp("native") / "repo", *PARTS)
    write_repository(repo, Manifest.read(repo), native=True)
    for extra in set(os.listdir(repo)) - {*PARTS, "manifest.json"}:
        shutil.rmtree(repo / extra)  # the python-backend models and ensembles: not what this checks
    return repo


def test_native_configs_match_the_onnx_models(native_repository):
    for part in PARTS:
        config = text_format.Parse(
            (native_repository / part / "configs" / "native.pbtxt").read_text(), mc.ModelConfig()
        )
        assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
        graph = onnx.load(native_repository / part / "1" / "model.onnx", load_external_data=False).graph
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            want = {
                t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type), t.type.tensor_type.shape)
                for t in actual
            }
            assert {t.name for t in declared} == set(want)
            for t in declared:
                dtype, shape = want[t.name]
                assert triton_to_np_dtype(mc.DataType.Name(t.data_type).removeprefix("TYPE_")) == dtype
                assert [d.dim_value for d in shape.dim[1:]] == list(t.dims)  # the batch axis is Triton's
                assert shape.dim[0].dim_param, f"{part}.{t.name}: the batch axis must be dynamic"
