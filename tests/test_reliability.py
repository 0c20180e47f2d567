"""Reliability and security of the served model, against real tritonservers on loopback.

Not repeated here (tested where they were built): bad image bytes and bad tensors in concurrent batches,
wrong dtype/shape, a busy port, a missing repository or artifact (test_server.py); unreadable files,
timeouts and retries until a server comes up (test_client.py); checkpoints refused unpickling
(test_checkpoint.py). Input cases come from `benchmarks.soak.cases`, which the soak sends too.
"""

from __future__ import annotations

import ast
import functools
import ipaddress
import json
import os
import queue
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve import d3qe
from d3qe_serve.benchmarks.soak import OVERLOAD, Case, cases, classify
from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import D3QEClient, RetryPolicy
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.server import DEFAULT_MAX_REQUEST_BYTES, SHM_DIR, TritonServer
from tests.helpers import LOGIT_TOL, copy_models, image_input, pixels_input, png_header_only

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ANSWER_WITHIN_S = 120  # every request of a burst is answered (scored or refused) within this, or the test fails


def send_all(client: grpcclient.InferenceServerClient, requests: list[tuple[str, list, int | None]]) -> list:
    """Send (model, inputs, queue timeout µs) all at once; every request's answers as (seconds, result or error)."""
    answers: list[list] = [[] for _ in requests]
    lock, started = threading.Condition(), []

    def done(i, result, error):
        with lock:
            answers[i].append((time.monotonic() - started[i], error if error is not None else result))
            lock.notify_all()

    for i, (model, inputs, timeout_us) in enumerate(requests):
        started.append(time.monotonic())
        client.async_infer(model, inputs, functools.partial(done, i), timeout=timeout_us)
    with lock:
        lock.wait_for(lambda: all(answers), timeout=ANSWER_WITHIN_S)
    time.sleep(0.5)  # a duplicate answer would arrive about now
    with lock:
        return [list(a) for a in answers]


def peak_rss_mib(server: TritonServer, model: str) -> float:
    """VmHWM of the python stub running `model` (a process in the server's group)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (
                os.getpgid(int(pid)) != server.pid
                or f"/{model}/1/model.py".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ProcessLookupError):
            continue
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    raise AssertionError(f"no python stub for {model} in the server's process group")


@pytest.fixture(scope="module")
def client(tiny_server):
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def eager(tiny_checkpoint) -> d3qe.D3QE:
    return d3qe.load_detector(tiny_checkpoint)


def eager_logit(model: d3qe.D3QE, case: Case) -> float:
    pixels = d3qe.preprocess(case.data.item()) if case.tensor == "IMAGE" else torch.from_numpy(case.data[0])
    with torch.inference_mode():
        return float(model(pixels[None]).item())


def test_odd_inputs_in_one_burst_each_get_their_own_answer(tiny_server, client, eager, tmp_path):
    # valid images converted like upstream (scored like the eager model) among refused ones, all in flight at once
    kinds = [
        *("photo 0", "CMYK JPEG", "16-bit PNG", "animated GIF (first frame)", "pixels"),
        *("1x1 PNG", "decompression bomb", "file path as the image", "over-size image", "too many images"),
        "over-size request",
        "Inf pixels",
    ]
    by_kind = {c.kind: c for c in cases(client.get_model_config("d3qe").config.max_batch_size, tmp_path)}
    sent = [by_kind[k] for k in kinds]
    header_only = np.array([[png_header_only(20000, 20000)]], dtype=np.object_)
    sent.append(Case("20000x20000 PNG header", "d3qe", "IMAGE", "BYTES", header_only, "decompression bomb"))
    want = {c.kind: eager_logit(eager, c) for c in sent if c.expect is None}
    peak_before = peak_rss_mib(tiny_server, "preprocess")
    answers = send_all(client, [(c.model, c.inputs(), None) for c in sent])
    for case, got in zip(sent, answers, strict=True):
        assert len(got) == 1, f"{case.kind}: {len(got)} answers"
        answer = got[0][1]
        error = answer if isinstance(answer, InferenceServerException) else None
        if case.expect is None:
            assert error is None, f"{case.kind}: {error}"
            assert abs(answer.as_numpy("LOGIT").item() - want[case.kind]) < LOGIT_TOL, case.kind
        else:
            assert classify(case, None if error else answer, error) == "refused", f"{case.kind}: {error or 'scored'}"
    assert client.is_server_live() and client.is_model_ready("d3qe")
    # nothing was decoded at its declared size: 20000×20000 RGB alone would be 1.2 GB
    assert peak_rss_mib(tiny_server, "preprocess") - peak_before < 1024


def test_a_client_deadline_expiring_mid_request_leaves_the_server_up(tiny_server, client, fixture_images):
    # the front lets Triton finish the request (server#7840: cancellations can crash this Triton)
    images = image_input([p.read_bytes() for p in fixture_images * 2][:8])  # a full batch: ~1 s here
    with pytest.raises(InferenceServerException) as err:
        client.infer("d3qe", [images], client_timeout=0.05)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    time.sleep(2)  # the abandoned request has finished inside the server
    assert client.is_server_live() and client.is_model_ready("d3qe")
    assert client.infer("d3qe", [image_input([fixture_images[0].read_bytes()])]).as_numpy("LOGIT").shape == (1, 1)


def test_streaming_goes_through_the_front_under_the_same_limit(tiny_server, expected):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            c.async_stream_infer("d3qe_tensor", [pixels_input(expected["x"])])
            result, error = answers.get(timeout=ANSWER_WITHIN_S)
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("LOGIT"), expected["x_logits_reference"], atol=LOGIT_TOL)
            over = image_input([bytes(DEFAULT_MAX_REQUEST_BYTES)])
            c.async_stream_infer("d3qe", [over])
            _, error = answers.get(timeout=ANSWER_WITHIN_S)
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in error.message()
        finally:
            c.stop_stream()
        assert c.is_server_live()


@pytest.fixture(scope="module")
def tight_repository(tiny_repository, tmp_path_factory) -> Path:
    """The tiny export with a tight gate: one batch admitted at a time, two more requests may wait."""
    repo = tmp_path_factory.mktemp("tight") / "repo"
    shutil.copytree(tiny_repository, repo)
    write_repository(repo, Manifest.read(repo), max_queue_size=2, admitted_batches=1)
    return repo


@pytest.fixture(scope="module")
def tight_server(tight_repository):
    """A server with the default settings (shared memory off) on the tight repository."""
    server = TritonServer(tight_repository, free_endpoints(), startup_timeout=300).start()
    yield server
    server.stop()


def _listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add(getattr(ip, "ipv4_mapped", None) or ip)
    return found


def test_security_defaults(tight_server):
    e = tight_server.endpoints
    for port in (e.grpc_port, e.http_port, e.metrics_port):
        assert _listening_addresses(port) == {ipaddress.ip_address("127.0.0.1")}, port  # not 0.0.0.0 or ::
    with grpcclient.InferenceServerClient(e.grpc_url) as c:
        refused = {
            "unload a model": lambda: c.unload_model("d3qe"),
            "load a model": lambda: c.load_model("d3qe"),
            "list the repository": lambda: c.get_model_repository_index(),
            "change logging": lambda: c.update_log_settings({"log_verbose_level": 1}),
            "change tracing": lambda: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            "register shared memory": lambda: c.register_system_shared_memory("region", "/anything", 1024),
            "list shared memory": lambda: c.get_system_shared_memory_status(),
        }
        for what, call in refused.items():
            with pytest.raises(InferenceServerException, match="restricted|not allowed") as err:
                call()
            assert err.value.status() == "StatusCode.UNAVAILABLE", what
        assert c.is_model_ready("d3qe")
    register = urllib.request.Request(
        f"{e.http_url}/v2/systemsharedmemory/region/region/register",
        data=b'{"key": "/anything", "offset": 0, "byte_size": 1024}',
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(register, timeout=10)


def test_overload_is_refused_promptly_and_every_request_is_accounted_for(tight_server, expected, fixture_images):
    scores = expected["image_logits_reference"][:, 0]
    images = [(p.read_bytes(), float(v)) for p, v in zip(fixture_images, scores, strict=True)]
    tensors = list(zip(expected["x"], expected["x_logits_reference"][:, 0], strict=True))
    burst = [("d3qe", image_input([data]), want) for data, want in (images[i % len(images)] for i in range(24))]
    burst += [("d3qe_tensor", pixels_input(x[None]), want) for x, want in (tensors[i % 3] for i in range(12))]
    with grpcclient.InferenceServerClient(tight_server.endpoints.grpc_url) as c:
        answers = send_all(c, [(model, [tensor], None) for model, tensor, _ in burst])
    latency: dict[str, list[float]] = {"scored": [], "rejected": []}
    per_model = {(model, outcome): 0 for model in ("d3qe", "d3qe_tensor") for outcome in latency}
    for (model, _, want), got in zip(burst, answers, strict=True):
        assert len(got) == 1, f"{len(got)} answers to one request"
        seconds, answer = got[0]
        if isinstance(answer, InferenceServerException):
            assert answer.status() == "StatusCode.UNAVAILABLE" and OVERLOAD.search(answer.message()), answer
            outcome = "rejected"
        else:
            assert abs(answer.as_numpy("LOGIT").item() - want) < LOGIT_TOL  # its own input's score
            outcome = "scored"
        latency[outcome].append(seconds)
        per_model[model, outcome] += 1
    assert all(per_model.values()), per_model
    # refused on arrival: before the first admitted batch could be scored
    assert max(latency["rejected"]) < min(latency["scored"]), latency


def test_a_client_may_ask_for_a_shorter_queue_limit(tight_server, fixture_images):
    image = fixture_images[0].read_bytes()
    busy, done = [], threading.Event()
    with grpcclient.InferenceServerClient(tight_server.endpoints.grpc_url) as c:
        c.async_infer("d3qe", [image_input([image] * 8)], lambda result, error: (busy.append(error), done.set()))
        time.sleep(0.3)  # the one admitted batch is being scored
        (impatient,) = send_all(c, [("d3qe", [image_input([image])], 1000)])  # at most 1 ms in the queue
        assert done.wait(ANSWER_WITHIN_S) and busy == [None], busy
    assert len(impatient) == 1
    answer = impatient[0][1]
    assert isinstance(answer, InferenceServerException), "scored although it could not wait for the batch"
    assert answer.status() == "StatusCode.UNAVAILABLE" and "Request timeout expired" in answer.message()


def test_overload_left_nothing_in_flight(tight_server):
    # After the overload test: a graceful stop finds no request in flight. Triton 2.51 would wait its 30 s exit
    # timeout for a lost one, then exit 1 (seen with a queue policy inside the ensemble).
    start = time.monotonic()
    assert tight_server.stop(timeout=90) == 0
    assert time.monotonic() - start < 25


def test_client_retries_survive_a_server_killed_and_restarted(tight_repository, fixture_images, expected):
    endpoints = free_endpoints()
    want = expected["image_logits_reference"][:, 0]
    items = [(p.name, p) for p in fixture_images]
    retry = RetryPolicy(attempts=200, initial_backoff=0.2, max_backoff=1.0)
    first = TritonServer(tight_repository, endpoints, startup_timeout=300).start()
    results: list = []
    try:
        with D3QEClient(endpoints.grpc_url, retry=retry, timeout=300, batch_size=8) as client:
            assert client.score_batch(items[:1])[0].ok
            worker = threading.Thread(target=lambda: results.extend(client.score_batch(items)))
            worker.start()
            time.sleep(0.3)  # the batch is in flight
            first.send_signal(signal.SIGKILL)
            assert first.wait() == -signal.SIGKILL
            assert not list(SHM_DIR.glob(f"{first.shm_prefix}*")), "the killed server's shared memory is left"
            with TritonServer(tight_repository, endpoints, startup_timeout=300):  # same ports
                worker.join(timeout=300)
                assert not worker.is_alive()
    finally:
        first.stop()
    assert [r.source for r in results] == [s for s, _ in items]
    for r, w in zip(results, want, strict=True):
        assert r.ok, r.error
        assert abs(r.logit - w) < LOGIT_TOL


def test_serve_names_a_corrupt_artifact_and_why(tiny_repository, tmp_path, capsys):
    repo = copy_models(tiny_repository, tmp_path / "repo", "vq_encoder")
    onnx = repo / "vq_encoder" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    e = free_endpoints()
    ports = ["--grpc-port", str(e.grpc_port), "--http-port", str(e.http_port), "--metrics-port", str(e.metrics_port)]
    assert main(["serve", "--model-repository", str(repo), *ports]) == 1
    err = capsys.readouterr().err
    reason = err.split("cannot start the server:")[1]
    assert "vq_encoder" in reason and "sha256 differs from manifest.json" in reason, reason


def test_serve_without_a_server_binary_says_so(tiny_repository, tmp_path, capsys):
    args = ["serve", "--model-repository", str(tiny_repository), "--tritonserver"]
    assert main([*args, str(tmp_path / "tritonserver")]) == 1
    assert f"no tritonserver at {tmp_path / 'tritonserver'}: no such file" in capsys.readouterr().err
    (tmp_path / "tritonserver").write_text("not a program")
    assert main([*args, str(tmp_path / "tritonserver")]) == 1
    assert "not an executable file" in capsys.readouterr().err


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [(ast.unparse(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_checkpoints_and_artifacts_are_read_without_unpickling():
    """Everything the project loads is read as weights only: torch.load(weights_only=True), safetensors, ONNX."""
    folders = [ROOT / d for d in ("d3qe", "export", "client", "benchmarks")]
    sources = [p for d in folders for p in d.rglob("*.py")] + list((ROOT / "model_repository").glob("*.py"))
    problems = []
    for path in sources:
        for name, call in _calls(ast.parse(path.read_text())):
            keywords = {k.arg: k.value for k in call.keywords}
            weights_only = keywords.get("weights_only")
            if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{path}:{call.lineno} torch.load without weights_only=True")
            if name in {"pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "joblib.load"}:
                problems.append(f"{path}:{call.lineno} {name}")
            allow = keywords.get("allow_pickle")
            if name in {"np.load", "numpy.load"} and isinstance(allow, ast.Constant) and allow.value:
                problems.append(f"{path}:{call.lineno} np.load(allow_pickle=True)")
    assert len(sources) > 20 and not problems, problems


def test_soak_accounts_for_every_request(tiny_server, tmp_path):
    out = tmp_path / "soak"
    args = ["soak", "--url", tiny_server.endpoints.grpc_url, "--seconds", "6", "--rate", "8", "--bad-fraction", "0.5"]
    assert main([*args, "--drain-timeout", "120", "--out", str(out)]) == 0
    report = json.loads((out / "soak.json").read_text())
    counts = report["counts"]
    assert counts["sent"] == 48  # open loop: 8/s for 6 s
    assert counts["lost"] == counts["duplicated"] == counts["wrong"] == counts["unexpected"] == 0
    assert counts["sent"] == counts["answered"] + counts["refused"] + counts["rejected"]
    assert counts["answered"] > 0 and counts["refused"] > 0
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
