"""`d3qe serve`'s supervision: a served tritonserver watched and healed without a person.

Every `interval` s the `Supervisor` asks `serving.health` whether each python-backend instance of the loaded
models still has its process, and whether tritonserver itself still runs. A dead part (or a server that
exited without being asked to) is healed by `TritonServer.restart`: a new server on the same ports, behind the
same gRPC front, so that from the moment it is noticed until the new one is ready clients get UNAVAILABLE
(which `D3QEClient` retries) and readiness is false; the gates answer a request that reached the dead part
before that with UNAVAILABLE too (`model_repository.admission`). Triton 2.51 itself never restarts a dead stub
(see `serving.health`). More than `max_restarts` heals within `window_s` seconds is a crash loop: the
supervisor stops the server and `run` returns False (`d3qe serve` exits 1), for whatever supervises
`d3qe serve` to act on.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from d3qe_serve.errors import ServerError
from d3qe_serve.serving.health import dead_instances, expected_instances
from d3qe_serve.serving.server import TritonServer

CHECK_INTERVAL_S = 0.5  # /proc reads only: cheap enough to notice a dead part within a second
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0


@dataclass(frozen=True)
class Heal:
    """One heal: why (`reason`), when it was noticed and when the new server was ready (`time.monotonic()`
    seconds; `ready_at` None when the restart failed, `error` saying why)."""

    reason: str
    noticed_at: float
    ready_at: float | None = None
    error: str | None = None


class Supervisor:
    """Watches the started `server` and heals it (see the module docstring). `run()` in the foreground, or
    `start()` it on a thread; `request_stop()` (from a signal handler, or another thread) ends the watch once
    the server has ended; `heals` lists what was done. Lines about each heal go to `log`."""

    def __init__(
        self,
        server: TritonServer,
        *,
        interval: float = CHECK_INTERVAL_S,
        max_restarts: int = MAX_RESTARTS,
        window_s: float = RESTART_WINDOW_S,
        log: IO[str] | None = sys.stderr,
    ) -> None:
        self.server = server
        self.interval = interval
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.log = log
        self.heals: list[Heal] = []
        self._stopping = False  # a plain flag: set from signal handlers, where taking a lock could deadlock
        self._thread: threading.Thread | None = None

    def request_stop(self) -> None:
        self._stopping = True

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.run, name="d3qe-supervisor", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _say(self, message: str) -> None:
        if self.log is not None:
            print(f"d3qe serve: {message}", file=self.log, flush=True)

    def _problem(self, expected: collections.Counter[str]) -> tuple[str | None, collections.Counter[str]]:
        """What is wrong (None: nothing), and the instances to expect from now on."""
        rc = self.server.poll()
        if rc is not None:
            return f"tritonserver exited with code {rc}", expected
        dead = dead_instances(self.server.pid, expected)
        if dead:  # asked again first: a model unloaded on purpose (a rollout's old version) is not a dead part
            with contextlib.suppress(ServerError):
                expected = expected_instances(self.server.endpoints.http_url)
            dead = dead_instances(self.server.pid, expected)
        return (f"dead part process{'es' if len(dead) > 1 else ''}: {', '.join(dead)}" if dead else None), expected

    def run(self) -> bool:
        """Watch until `request_stop()` (True; the caller stops or waits for the server) or a crash loop (False:
        the server is stopped)."""
        expected = expected_instances(self.server.endpoints.http_url)
        while not self._stopping:
            time.sleep(self.interval)
            problem, expected = self._problem(expected)
            if problem is None:
                continue
            if self._stopping:  # the server ending is what was asked for
                break
            recent = [h for h in self.heals if h.noticed_at > time.monotonic() - self.window_s]
            if len(recent) >= self.max_restarts:
                self._say(f"{problem}; {len(recent)} restarts in {self.window_s:.0f} s already: giving up")
                self.server.stop()
                return False
            expected = self._heal(problem) or expected
        return True

    def _heal(self, problem: str) -> collections.Counter[str] | None:
        """Restart the server; the instances the new one has (None if the restart failed)."""
        noticed = time.monotonic()
        self._say(f"{problem}: restarting tritonserver (clients get UNAVAILABLE meanwhile)")
        try:
            self.server.restart()
            expected = expected_instances(self.server.endpoints.http_url)
        except ServerError as e:
            self.heals.append(Heal(problem, noticed, error=str(e)))
            self._say(f"restart failed: {e}")
            return None
        if self._stopping:  # asked to stop while it restarted: the signal went to the old server
            self.server.send_signal(signal.SIGTERM)
        heal = Heal(problem, noticed, time.monotonic())
        self.heals.append(heal)
        self._say(f"healed: ready again after {heal.ready_at - noticed:.1f} s (pid {self.server.pid})")
        return expected
