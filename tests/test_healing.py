"""A part's process killed (`kill -9` on the vq_encoder's python-backend stub), on a real tritonserver serving
the tiny export: noticed by the probe `d3qe health` and `deploy/` run, refused as UNAVAILABLE (never
INTERNAL), healed by `d3qe serve`'s supervision, and under load no request failed or lost.

The bounds are loose (this machine is shared: a restart of the tiny export took 21 to 240 s here); the
benchmark (`d3qe bench-heal`) measures the seconds.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve.benchmarks.heal import HEAL_RETRY, HealLoad, measure_heal, passed
from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.health import expected_instances, probe, running_stubs
from d3qe_serve.serving.server import TritonServer
from d3qe_serve.serving.supervisor import Supervisor
from tests.helpers import LOGIT_TOL, image_input

pytestmark = [pytest.mark.server, pytest.mark.slow]

PART = "vq_encoder_0_0"
NOTICED_S = 10.0  # the supervisor looks every 0.5 s; the probe is one call
HEALED_S = 600.0  # a whole restart of the tiny export, on a shared 2-core machine


def _kill(server: TritonServer, instance: str) -> int:
    (pid,) = [pid for pid, argv in running_stubs(server.pid).items() if instance in argv]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_dead_part_is_unready_refused_as_unavailable_and_healed(tiny_repository, fixture_images, tmp_path, capsys):
    with (
        (tmp_path / "server.log").open("w") as log,
        TritonServer(tiny_repository, free_endpoints(), log=log) as server,
    ):
        http, port = server.endpoints.http_url, str(server.endpoints.http_port)
        items = [(p.name, p) for p in fixture_images]
        with D3QEClient(server.endpoints.grpc_url) as client:
            before = [r.logit for r in client.score(items)]
        expected = expected_instances(http)
        assert expected[PART] == 1 and all(k.split("_")[-1].isdigit() for k in expected)
        assert probe(http, server.pid).ready
        assert main(["health", "--http-port", port]) == 0

        _kill(server, PART)
        deadline = time.monotonic() + NOTICED_S
        while probe(http, server.pid).dead != (PART,):
            assert time.monotonic() < deadline, "the probe did not notice the dead part"
            time.sleep(0.1)
        health = probe(http, server.pid)
        assert health.triton_ready and not health.ready and not health.live  # Triton alone still says ready
        assert main(["health", "--http-port", port]) == 1
        assert main(["health", "--live", "--http-port", port]) == 1
        assert PART in capsys.readouterr().err

        with (
            grpcclient.InferenceServerClient(server.endpoints.grpc_url) as raw,
            pytest.raises(InferenceServerException) as refused,
        ):
            raw.infer("d3qe", [image_input([fixture_images[0].read_bytes()])])
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value  # what clients retry
        assert "not healthy" in refused.value.message()

        old_pid = server.pid
        supervisor = Supervisor(server, log=log).start()
        with D3QEClient(server.endpoints.grpc_url, retry=HEAL_RETRY) as client:
            after = list(client.score(items))
        supervisor.request_stop()
        supervisor.join(10)
        assert [r.error for r in after] == [None] * len(items)
        np.testing.assert_allclose([r.logit for r in after], before, atol=LOGIT_TOL)
        (heal,) = supervisor.heals
        assert heal.reason == f"dead part process: {PART}" and heal.error is None
        assert heal.ready_at - heal.noticed_at < HEALED_S
        assert server.pid != old_pid
        assert main(["health", "--http-port", port]) == 0


def test_under_load_no_request_fails_or_is_lost_and_none_sees_internal(tiny_repository, tmp_path):
    load = HealLoad(clients=3, before_s=3.0, after_s=3.0, heal_timeout_s=HEALED_S, retry=HEAL_RETRY)
    report = measure_heal(tiny_repository, load, tmp_path / "server.log")
    requests, seconds = report["requests"], report["seconds"]
    assert requests["sent"] > 0 and requests["hung_clients"] == 0
    assert requests["failed"] == requests["wrong"] == requests["lost"] == 0, requests
    observed = report["observer_statuses_after_kill"]
    assert "INTERNAL" not in observed and observed.get("UNAVAILABLE", 0) > 0, observed
    assert seconds["until_not_ready"] is not None and seconds["until_not_ready"] < NOTICED_S, seconds
    assert seconds["until_answered_again"] is not None and seconds["until_answered_again"] < HEALED_S, seconds
    assert passed(report)
