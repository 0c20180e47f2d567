"""Rollout and rollback on a real tritonserver under load; the model-control key; what every answer says.

Truth: the fixture's upstream logits for the served export, the eager model for the second checkpoint; the
manifest ids are the exports' own (`Manifest.read(...).id`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.client.results import ScoreResult
from d3qe_serve.contract import MANIFEST_ID, PIXELS, RGB, THRESHOLD, entrances
from d3qe_serve.errors import InputError, ManifestError, RolloutError, ServerError
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.grpc_front import AdminKey
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.operating_point import OperatingPoint
from d3qe_serve.serving.rollout import LIVE, ROLLOUTS, LiveRecord, live_models, read_key, rollback, rollout
from d3qe_serve.serving.server import TritonServer
from d3qe_serve.serving.server_config import ADMIN_HEADER, GRPC_HEADER_PREFIX, ServerConfig
from tests.fixture_weights import FIXTURE
from tests.helpers import LOGIT_TOL, image_input

pytest.register_assert_rewrite("tests.rollout_fixtures")  # a plugin of these tests, imported here first
from tests.rollout_fixtures import Load, close, eager_logits, key_file, logit, served_copy  # noqa: E402

pytest_plugins = ("tests.rollout_fixtures",)  # other_checkpoint, other_export
pytestmark = [pytest.mark.server, pytest.mark.slow]
HEADER = GRPC_HEADER_PREFIX + ADMIN_HEADER


def test_score_result_round_trip():
    r = ScoreResult.from_scores("a.png", 1.5, 0.8175744761936437, 0.9, "ab" * 32)
    assert r.verdict == "real" and r.threshold == 0.9 and r.manifest_id == "ab" * 32
    assert ScoreResult.from_dict(json.loads(json.dumps(r.as_dict()))) == r
    failed = ScoreResult.failed("b.png", "undecodable")
    assert ScoreResult.from_dict(failed.as_dict()) == failed and failed.threshold is None
    assert ScoreResult.from_dict({"source": "old.png", "logit": 0.1}).manifest_id is None  # a row of before


def test_the_key_file_must_be_private_and_one_word(tmp_path):
    path, key = key_file(tmp_path)
    assert read_key(path) == key
    path.chmod(0o644)
    with pytest.raises(InputError, match="readable by others"):
        read_key(path)
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(InputError, match="16 characters"):
        read_key(path)
    with pytest.raises(InputError, match="No such file"):
        read_key(tmp_path / "missing")


def test_the_front_passes_the_admin_header_only_with_the_key():
    admin = AdminKey(HEADER, upstream="triton-own", key="operator-key-1234567")
    assert admin.forwarded(HEADER, "operator-key-1234567") == (HEADER, "triton-own")
    assert admin.forwarded(HEADER, "triton-own") is None  # Triton's own value, read off its command line: dropped
    assert admin.forwarded(HEADER, "guess") is None
    assert admin.forwarded("other", "x") == ("other", "x")
    assert AdminKey(HEADER, upstream="triton-own").forwarded(HEADER, "triton-own") is None  # no key: nobody
    assert "operator-key" not in repr(admin) and "triton-own" not in repr(admin)


def test_server_flags_for_model_control_and_the_cache(tmp_path):
    off = ServerConfig(tmp_path, admin_key="k").arguments()
    assert "--model-control-mode=none" in off and not any("cache" in a for a in off)
    on = ServerConfig(tmp_path, admin_key="k", model_control=True, cache_bytes=1024, cache_directory="/c").arguments()
    assert "--model-control-mode=explicit" in on and "--load-model=*" in on
    assert "--cache-config=local,size=1024" in on and "--cache-directory=/c" in on
    live = ServerConfig(tmp_path, admin_key="k", load_models=("d3qe_v2", "d3qe")).arguments()
    assert "--model-control-mode=explicit" in live and {"--load-model=d3qe_v2", "--load-model=d3qe"} <= set(live)


def test_model_control_needs_the_front_that_checks_the_key(tiny_repository):
    server = TritonServer(tiny_repository, free_endpoints(), admin_key="k" * 24, max_request_bytes=None)
    with pytest.raises(ServerError, match="model control needs the gRPC front"):
        server.start()
    assert server.pid is None  # refused before anything ran


def test_every_entrance_answers_with_its_manifest_id_and_threshold(tiny_server, tiny_repository):
    manifest_id = Manifest.read(tiny_repository).id
    signatures = entrances()
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as client:
        image = sorted((FIXTURE / "images").iterdir())[0].read_bytes()
        rgb = np.zeros((2, 64, 48, 3), np.uint8)
        pixels = np.full((3, *signatures["d3qe_tensor"].input.dims), 0.5, np.float32)
        inputs = {
            "d3qe": image_input([image, image]),
            "d3qe_evidence": image_input([image]),
            "d3qe_rgb": grpcclient.InferInput(RGB, list(rgb.shape), "UINT8"),
            "d3qe_tensor": grpcclient.InferInput(PIXELS, list(pixels.shape), "FP32"),
        }
        inputs["d3qe_rgb"].set_data_from_numpy(rgb)
        inputs["d3qe_tensor"].set_data_from_numpy(pixels)
        for model, tensor in inputs.items():
            r = client.infer(model, [tensor])
            n = tensor.shape()[0]
            assert r.as_numpy(MANIFEST_ID).shape == (n, 1), model
            assert [v.decode() for v in r.as_numpy(MANIFEST_ID)[:, 0]] == [manifest_id] * n, model
            assert np.all(r.as_numpy(THRESHOLD) == np.float32(OperatingPoint.read(tiny_repository).threshold)), model
    with D3QEClient(tiny_server.endpoints.grpc_url) as scorer:
        (result,) = scorer.score([("x.png", image)])
        assert (result.manifest_id, result.threshold) == (manifest_id, 0.5)
    with D3QEClient(tiny_server.endpoints.grpc_url, threshold=0.99) as scorer:
        (result,) = scorer.score([("x.png", image)])
        assert result.threshold == 0.99 and result.verdict == "real"  # the caller's threshold wins


def test_score_json_prints_what_produced_each_score(tiny_server, tiny_repository, fixture_images):
    url = tiny_server.endpoints.grpc_url
    out = subprocess.run(
        [sys.executable, "-m", "d3qe_serve.cli.main", "score", str(fixture_images[0]), "--json", "--url", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = json.loads(out.splitlines()[0])
    assert row["manifest_id"] == Manifest.read(tiny_repository).id and row["threshold"] == 0.5


@pytest.fixture(scope="module")
def control(tiny_repository, tmp_path_factory):
    """A served copy of the fixture's export with model control on, the key in a file; and the key."""
    folder = tmp_path_factory.mktemp("rollout")
    repo = served_copy(tiny_repository, folder / "repo")
    path, key = key_file(folder)
    log = folder / "server.log"
    with log.open("w") as sink, TritonServer(repo, free_endpoints(), log=sink, admin_key=read_key(path)) as server:
        yield server, repo, path, key, log


def test_without_the_key_model_control_is_refused(control, tiny_server):
    server, _, _, key, _ = control
    with grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client:
        for headers in (None, {HEADER: "not-the-key-0123456789"}):
            with pytest.raises(InferenceServerException, match="restricted"):
                client.load_model("d3qe", headers=headers)
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_repository_index(headers=headers)
        assert client.get_model_repository_index(headers={HEADER: key}, as_json=True)["models"]
    # Loading off (the default): refused whatever is sent, Triton's own value read off its command line too.
    cmdline = _read(f"/proc/{tiny_server.pid}/cmdline").split(b"\0")
    triton_key = next(a for a in cmdline if a.startswith(b"--grpc-restricted-protocol")).decode().rsplit("=", 1)[1]
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as client:
        for value in (key, triton_key):
            with pytest.raises(InferenceServerException, match="restricted"):
                client.load_model("d3qe", headers={HEADER: value})


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _process_arguments(root_pid: int) -> str:
    """The command lines of a process and all its descendants."""
    seen, todo, text = set(), [root_pid], []
    while todo:
        pid = todo.pop()
        seen.add(pid)
        try:
            text.append(_read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace"))
            children = _read(f"/proc/{pid}/task/{pid}/children").split()
        except OSError:
            continue
        todo += [int(c) for c in children if int(c) not in seen]
    return "\n".join(text)


def test_a_broken_or_foreign_export_is_refused_and_the_live_one_serves(control, other_export, tmp_path):
    server, repo, _, key, _ = control
    live_id = LiveRecord.of(repo).current.manifest_id
    broken = shutil.copytree(other_export, tmp_path / "broken")
    entry = Manifest.read(broken).parts["d3qe_head"]
    with open(broken / entry.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        rollout(repo, broken, url=server.endpoints.grpc_url, key=key)
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ManifestError, match="not an export"):
        rollout(repo, tmp_path / "foreign", url=server.endpoints.grpc_url, key=key)
    with pytest.raises(RolloutError, match="restricted"):
        rollout(repo, other_export, url=server.endpoints.grpc_url, key="wrong-key-0123456789")
    assert not (repo / ROLLOUTS).exists() and not list(repo.glob("*_v2"))  # nothing staged
    with grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client:
        assert logit(client, sorted((FIXTURE / "images").iterdir())[0].read_bytes())[1] == live_id


def test_rollout_and_rollback_under_load(
    control, other_export, other_checkpoint, fixture_images, expected, tiny_repository, tmp_path
):
    server, repo, key_path, key, log = control
    first, second = Manifest.read(tiny_repository).id, Manifest.read(other_export).id
    truth = {
        first: dict(zip([p.name for p in fixture_images], expected["image_logits_reference"][:, 0], strict=True)),
        second: eager_logits(other_checkpoint, fixture_images),
    }
    url = server.endpoints.grpc_url
    with Load(url, fixture_images) as load:
        load.wait_for(6)
        command = ["rollout", str(other_export), "--model-repository", str(repo), "--url", url]
        printed = subprocess.run(
            [sys.executable, "-m", "d3qe_serve.cli.main", *command, "--key-file", str(key_path)],
            capture_output=True,
            text=True,
        )
        assert printed.returncode == 0, printed.stderr
        assert f"live generation 2: export {second[:16]}" in printed.stdout
        load.wait_for(6)
        record = rollback(repo, url=url, key=key)
        assert record.live == 1
        load.wait_for(6)
    assert load.failures == {} and load.lost == 0, (load.failures, load.sent)
    ids = [a.manifest_id for a in load.answers]
    assert set(ids) == {first, second}
    assert ids[-1] == first and ids.index(second) > 0  # answered by the first, then the second, then the first
    for a in load.answers:
        assert close(a.logit, truth[a.manifest_id][a.image], LOGIT_TOL), (a, truth[a.manifest_id][a.image])
        assert a.threshold == 0.5
    # The old generation is unloaded after the switch; a restarted server loads the live one only.
    with grpcclient.InferenceServerClient(url) as client:
        states = LiveRecord.read(repo)
        index = client.get_model_repository_index(headers={HEADER: key}, as_json=True)["models"]
        ready = {(m["name"], m["version"]) for m in index if m.get("state") == "READY"}
    assert ("d3qe", "1") in ready and ("d3qe", "2") not in ready
    assert not any(name.endswith("_v2") for name, _ in ready)
    assert set(live_models(repo)) == {*states.current.models, *entrances()}
    # The key is in no command line and no log of ours.
    assert key not in _process_arguments(os.getpid()) and key not in _process_arguments(server.pid)
    assert key not in log.read_text() and key not in printed.stdout + printed.stderr
    assert (repo / LIVE).is_file() and key not in (repo / LIVE).read_text()
