"""`d3qe bench-heal`: a part's process killed under load, and what the clients and the probes saw.

A tritonserver on the export, watched by `d3qe serve`'s `Supervisor`; `clients` threads score one image per
request continuously through `D3QEClient` (which retries UNAVAILABLE with `retry`), one more sends without
retrying and records every status it gets (`observed`: INTERNAL must never be among them), and the health
probe that `d3qe health` and `deploy/`'s pods run (`serving.health.probe`) is polled every `probe_interval`
s. After `before_s` s the `part`'s first python-backend stub is sent SIGKILL (as the OOM killer would); the
load goes on until the supervisor has healed the server and `after_s` s more, then the answers are drained.

Reported (heal.json, heal.png under `benchmarks/results/<machine>-<date>/`): seconds from the kill until the
probe said not ready, until the server was ready again, until a request sent after the kill was answered;
requests sent, answered (each with the logit the image got before the kill), failed (an error the client gave
back after its retries: goal 0), wrong (a logit other than before), lost (no answer: goal 0), and the statuses
the non-retrying observer got.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve.benchmarks import Results, report_header, results_dir, save_figure
from d3qe_serve.benchmarks.bench import synthetic_images
from d3qe_serve.client.grpc_client import D3QEClient, RetryPolicy
from d3qe_serve.contract import IMAGE, IMAGE_ENTRANCE
from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.health import expected_instances, probe, running_stubs
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.server import TritonServer
from d3qe_serve.serving.supervisor import Supervisor

SCORE_TOL = 1e-4  # batched with other requests, a logit may move by ~1e-6
# Retries that carry a request across a whole restart (0.2 s doubling to 2 s, 320 tries: about 10 minutes); the
# client's default (5 tries, about 3 s) gives up during one.
HEAL_RETRY = RetryPolicy(attempts=320, initial_backoff=0.2, multiplier=2.0, max_backoff=2.0)


@dataclass(frozen=True)
class HealLoad:
    """The load and the kill: see the module docstring."""

    clients: int = 4
    part: str = "vq_encoder"
    before_s: float = 5.0
    after_s: float = 5.0
    heal_timeout_s: float = 300.0
    drain_timeout_s: float = 120.0
    probe_interval: float = 0.1
    images: int = 4
    retry: RetryPolicy = field(default=HEAL_RETRY)


@dataclass
class _Ledger:
    """Requests as they go: (sent, done, logit or None, error or None, image index) per request."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    done: list[tuple[float, float, float | None, str | None, int]] = field(default_factory=list)
    observed: list[tuple[float, str]] = field(default_factory=list)  # (time, status) of the observer's requests
    health: list[tuple[float, bool]] = field(default_factory=list)  # (time, probe says ready)


def _kill_stub(server: TritonServer, instance: str) -> int:
    """SIGKILL to the stub of `instance` under the server; its pid."""
    for pid, argv in running_stubs(server.pid).items():
        if instance in argv:
            os.kill(pid, signal.SIGKILL)
            return pid
    raise ServerError(f"no live stub of {instance} under tritonserver {server.pid}")


def _client_loop(url: str, images: list[bytes], retry: RetryPolicy, ledger: _Ledger, stop: threading.Event, k: int):
    with D3QEClient(url, retry=retry, concurrency=1, batch_size=1) as client:
        i = k
        while not stop.is_set():
            n = i % len(images)
            with ledger.lock:
                ledger.sent += 1
            sent = time.monotonic()
            (r,) = client.score_batch([(f"image-{n}", images[n])])
            with ledger.lock:
                ledger.done.append((sent, time.monotonic(), r.logit, r.error, n))
            i += 1


def _observer_loop(url: str, image: bytes, ledger: _Ledger, stop: threading.Event) -> None:
    """Requests without retries, every status recorded (`ok` for an answer)."""
    with grpcclient.InferenceServerClient(url) as client:
        while not stop.is_set():
            t = grpcclient.InferInput(IMAGE, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[image]], dtype=np.object_))
            try:
                client.infer(IMAGE_ENTRANCE, [t], client_timeout=60)
                status = "ok"
            except InferenceServerException as e:
                status = (e.status() or "client").removeprefix("StatusCode.")
                time.sleep(0.05)  # a refusal comes back at once: do not spin
            with ledger.lock:
                ledger.observed.append((time.monotonic(), status))


def _probe_loop(server: TritonServer, expected, ledger: _Ledger, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        pid = server.pid
        ready = pid is not None and probe(server.endpoints.http_url, pid, expected).ready
        ledger.health.append((time.monotonic(), ready))


def measure_heal(repository: Path, load: HealLoad = HealLoad(), log_path: Path | None = None) -> dict:
    """The kill under load on a server started on `repository` (module docstring); the report's measurements."""
    images = synthetic_images(load.images, seed=0)
    ledger, stop = _Ledger(), threading.Event()
    with (
        open(log_path or os.devnull, "w") as log,
        TritonServer(repository, free_endpoints(), log=log) as server,
    ):
        supervisor = Supervisor(server, log=log).start()
        url = server.endpoints.grpc_url
        with D3QEClient(url) as client:  # each image's logit alone, before anything is killed
            before = [r.logit for r in client.score((f"image-{n}", b) for n, b in enumerate(images))]
        expected = expected_instances(server.endpoints.http_url)
        instance = f"{load.part}_0_0"
        if instance not in expected:
            raise ServerError(f"{instance} is not a python-backend instance of {repository} ({sorted(expected)})")
        threads = [
            threading.Thread(target=_client_loop, args=(url, images, load.retry, ledger, stop, k), daemon=True)
            for k in range(load.clients)
        ]
        threads += [
            threading.Thread(target=_observer_loop, args=(url, images[0], ledger, stop), daemon=True),
            threading.Thread(
                target=_probe_loop, args=(server, expected, ledger, stop, load.probe_interval), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        time.sleep(load.before_s)
        killed_pid, killed_at = _kill_stub(server, instance), time.monotonic()
        deadline = killed_at + load.heal_timeout_s
        while not any(h.ready_at for h in supervisor.heals) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(load.after_s)
        stop.set()
        for t in threads:
            t.join(load.drain_timeout_s)
        hung = sum(t.is_alive() for t in threads[: load.clients])
        supervisor.request_stop()
        supervisor.join(5)
    return _summary(load, ledger, before, killed_at, killed_pid, instance, supervisor, hung)


def _first(times: list[float]) -> float | None:
    return round(min(times), 2) if times else None


def _summary(load, ledger, before, killed_at, killed_pid, instance, supervisor, hung) -> dict:
    done = ledger.done
    answered = [d for d in done if d[3] is None]
    wrong = [d for d in answered if abs(d[2] - before[d[4]]) > SCORE_TOL]
    health_after = [(t - killed_at, ready) for t, ready in ledger.health if t >= killed_at]
    not_ready = [t for t, ready in health_after if not ready]
    ready_again = [t for t, ready in health_after if ready and not_ready and t > min(not_ready)]
    observed = collections.Counter(s for t, s in ledger.observed if t >= killed_at)
    heals = [
        {**asdict(h), "noticed_after_s": round(h.noticed_at - killed_at, 2)}
        | ({"ready_after_s": round(h.ready_at - killed_at, 2)} if h.ready_at else {})
        for h in supervisor.heals
    ]
    return {
        "settings": {**asdict(load), "retry": asdict(load.retry)},
        "killed": {"instance": instance, "pid": killed_pid},
        "seconds": {
            "until_not_ready": _first(not_ready),
            "until_ready_again": _first(ready_again),
            "until_answered_again": _first([d[1] - killed_at for d in answered if d[0] > killed_at]),
        },
        "requests": {
            "sent": ledger.sent,
            "answered": len(answered),
            "failed": len(done) - len(answered),
            "wrong": len(wrong),
            "lost": ledger.sent - len(done),
            "hung_clients": hung,
            "errors": dict(collections.Counter(d[3] for d in done if d[3] is not None)),
        },
        "observer_statuses_after_kill": dict(observed),
        "heals": heals,
        "timeline": {
            "requests": [[round(s - killed_at, 3), round(e - killed_at, 3), err is None] for s, e, _, err, _ in done],
            "health": [[round(t, 3), ready] for t, ready in health_after],
        },
    }


def passed(report: dict) -> bool:
    """No request failed after the client's retries, none wrong or lost, no INTERNAL seen, and a heal."""
    r = report["requests"]
    return (
        r["failed"] == r["wrong"] == r["lost"] == 0
        and "INTERNAL" not in report["observer_statuses_after_kill"]
        and report["seconds"]["until_answered_again"] is not None
    )


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    requests = np.array(report["timeline"]["requests"] or [[0.0, 0.0, True]], dtype=float)
    ok = requests[:, 2] > 0
    ax.scatter(requests[ok, 1], requests[ok, 1] - requests[ok, 0], s=6, label="answered (end, latency)")
    ax.scatter(requests[~ok, 1], requests[~ok, 1] - requests[~ok, 0], s=12, c="red", label="failed after retries")
    health = report["timeline"]["health"]
    for (t0, ready), (t1, _) in itertools.pairwise(health):
        if not ready:
            ax.axvspan(t0, t1, color="orange", alpha=0.3, lw=0)
    ax.axvline(0, color="black", ls="--", label="stub killed")
    ax.plot([], [], color="orange", alpha=0.3, lw=8, label="probe: not ready")
    ax.set_xlabel("seconds since the kill")
    ax.set_ylabel("request latency (s)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path, report["title"])


def run_heal(repository: Path, load: HealLoad = HealLoad(), out: Path | None = None) -> Results:
    """`measure_heal`, written to heal.json and heal.png in `out` (default `results_dir`)."""
    info = machine("cpu")
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = measure_heal(repository, load, out_dir / "heal-server.log")
    report = {**report_header(f"d3qe bench-heal, {load.part} killed under load", info), **measured}
    report["settings"]["model_repository"] = str(repository)
    (out_dir / "heal.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(out_dir / "heal.png", report)
    return Results.written(report, out_dir, "heal.json", "heal.png")


def summary_lines(report: dict) -> list[str]:
    s, r = report["seconds"], report["requests"]
    return [
        f"killed {report['killed']['instance']} (pid {report['killed']['pid']}) under {report['settings']['clients']} "
        f"clients: not ready after {s['until_not_ready']} s, ready again after {s['until_ready_again']} s, "
        f"answered again after {s['until_answered_again']} s",
        f"requests: {r['sent']} sent, {r['answered']} answered, {r['failed']} failed, {r['wrong']} wrong, "
        f"{r['lost']} lost; the non-retrying observer saw {report['observer_statuses_after_kill']}",
    ]
