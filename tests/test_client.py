"""The gRPC client against a real Triton server serving the fixture checkpoint exported with `d3qe export`."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import (
    AsyncD3QEClient,
    D3QEClient,
    ModelMismatchError,
    RetryPolicy,
    ServerNotReadyError,
)
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.server import TritonServer
from tests.helpers import LOGIT_TOL

pytestmark = [pytest.mark.server, pytest.mark.slow]



@pytest.fixture(scope="module")
def items(fixture_images) -> list[tuple[str, bytes | Path]]:
    """The fixture images with bad inputs between them: undecodable bytes, an empty file, a missing path."""
    good = [(p.name, p) for p in fixture_images]
    return [
        *good[:2],
        ("garbage", b"\x89PNG\r\n\x1a\n not really"),
        *good[2:5],
        ("empty", b""),
        ("missing", Path("/nonexistent/image.png")),
        *good[5:],
    ]


def check(results, items, expected) -> None:
    """Good images carry the fixture's logits, in input order; each bad one fails alone with its reason."""
    want = dict(zip(map(str, expected["image_names"]), expected["image_logits_reference"][:, 0], strict=True))
    assert [r.source for r in results] == [s for s, _ in items]
    for r in results:
        if r.source in want:
            assert r.ok, r.error
            assert abs(r.logit - want[r.source]) < LOGIT_TOL
            assert abs(r.probability - 1 / (1 + np.exp(-r.logit))) < 1e-6
            assert r.verdict == ("generated" if r.probability > 0.5 else "real")
        else:
            assert not r.ok and r.logit is None and r.verdict is None
    errors = {r.source: r.error for r in results if not r.ok}
    assert set(errors) == {"garbage", "empty", "missing"}
    assert "cannot read image file" in errors["missing"]
    assert "decodable" in errors["garbage"] and "empty" in errors["empty"]


def test_sync_client_batches_and_isolates_bad_images(tiny_server, items, expected):
    with D3QEClient(tiny_server.endpoints.grpc_url, batch_size=4, concurrency=2) as client:
        info = client.wait_until_ready(timeout=30)
        assert info.name == "d3qe" and info.max_batch_size >= 4
        check(list(client.score(items)), items, expected)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
def test_async_client(tiny_server, items, expected, shared_memory):
    async def score() -> list:
        async with AsyncD3QEClient(
            tiny_server.endpoints.grpc_url, batch_size=3, concurrency=3, shared_memory=shared_memory
        ) as client:
            await client.wait_until_ready(timeout=30)
            return [r async for r in client.score(items)]

    check(asyncio.run(score()), items, expected)


def test_sync_client_shared_memory_regions_grow(tiny_server, items, expected):
    # batch 1 then batch 8: the region sized for one image is replaced (unregistered, registered) by a larger one
    with D3QEClient(tiny_server.endpoints.grpc_url, batch_size=1, concurrency=1, shared_memory=True) as client:
        check(list(client.score(items)), items, expected)
        client.batch_size = 8
        check(list(client.score(items)), items, expected)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_request_timeout_fails_the_batch_and_leaves_the_server_up(tiny_server, fixture_images, expected, asynchronous):
    url = tiny_server.endpoints.grpc_url

    async def score_async() -> list:
        async with AsyncD3QEClient(url, batch_size=2, timeout=0.001) as client:
            return [r async for r in client.score_paths(fixture_images[:3])]

    if not asynchronous:
        with D3QEClient(url, batch_size=2, timeout=0.001) as client:
            results = list(client.score_paths(fixture_images[:3]))
    else:
        results = asyncio.run(score_async())
    assert [r.source for r in results] == [str(p) for p in fixture_images[:3]]
    assert all(not r.ok and "timed out after 0.001 s" in r.error for r in results)
    # The calls were not cancelled on the server (a cancelled call can crash Triton 24.10): it still answers.
    with D3QEClient(tiny_server.endpoints.grpc_url) as client:
        (result,) = client.score_batch([("again", fixture_images[0])])
    assert abs(result.logit - expected["image_logits_reference"][0, 0]) < LOGIT_TOL


def test_unavailable_is_retried_until_the_server_is_up(tiny_repository, fixture_images, expected):
    endpoints = free_endpoints()
    results: list = []
    retry = RetryPolicy(attempts=60, initial_backoff=0.2, max_backoff=1.0)
    with D3QEClient(endpoints.grpc_url, retry=retry, timeout=60) as client:
        worker = threading.Thread(target=lambda: results.extend(client.score_batch([("a", fixture_images[0])])))
        worker.start()
        time.sleep(1.0)  # the client is now retrying against a closed port
        with TritonServer(tiny_repository, endpoints):
            worker.join(timeout=120)
    assert not worker.is_alive()
    assert results[0].ok, results[0].error
    assert abs(results[0].logit - expected["image_logits_reference"][0, 0]) < LOGIT_TOL


def test_unavailable_retries_are_capped(fixture_images):
    endpoints = free_endpoints()  # nothing listens there
    retry = RetryPolicy(attempts=3, initial_backoff=0.05)
    with D3QEClient(endpoints.grpc_url, retry=retry) as client:
        (result,) = client.score_batch([("a", fixture_images[0])])
        with pytest.raises(ServerNotReadyError, match="not ready after 0.5 s"):
            client.wait_until_ready(timeout=0.5)
    assert not result.ok and "server unavailable after 3 attempts" in result.error


def test_model_interface_is_checked(tiny_server):
    url = tiny_server.endpoints.grpc_url
    with D3QEClient(url, model="d3qe_tensor") as client, pytest.raises(ModelMismatchError, match="IMAGE: BYTES"):
        client.wait_until_ready(timeout=30)
    with D3QEClient(url, model="no_such_model") as client, pytest.raises(ServerNotReadyError, match="no_such_model"):
        client.wait_until_ready(timeout=1)


def test_score_command_uses_the_server_by_default(tiny_server, fixture_images, expected, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    for p in fixture_images:
        shutil.copy(p, folder / "nested" / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["score", "--url", tiny_server.endpoints.grpc_url, "--json", str(folder)])
    rows = {Path(r["source"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1
    assert "decodable" in rows["broken.png"]["error"]
    for name, logit in zip(expected["image_names"], expected["image_logits_reference"][:, 0], strict=True):
        assert abs(rows[str(name)]["logit"] - logit) < LOGIT_TOL
