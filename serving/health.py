"""Whether a tritonserver's parts can answer: the probe `d3qe serve`'s supervision and `deploy/`'s pods both use.

Triton 2.51 does not notice a python-backend model whose process died (killed by the OOM killer, a segfault
in a runtime): the server stays live and every model ready, and each request the dead instance gets fails
INTERNAL "Stub process '<instance>' is not healthy" for ever; nothing restarts it. What shows it is the
process table: each python-backend instance is a `triton_python_backend_stub` child of the server, its
instance name (`<group name>_<k>`) in its arguments, and a killed stub stays a zombie (the server does not
reap it). `probe` compares the instances the loaded models' configs ask for with the stubs alive under the
server, and adds Triton's own liveness and readiness (HTTP, `/v2/...`; the statistics and config APIs it reads
are not among the restricted ones). Linux only (/proc); standard library only, so that a probe starts fast.
"""

from __future__ import annotations

import collections
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from d3qe_serve.errors import ServerError

STUB = "triton_python_backend_stub"
PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class Health:
    """One probe's answer: Triton's own liveness and readiness, and the python-backend instances whose process
    is gone (`dead`, instance names). `live`/`ready` are what Kubernetes' probes and `d3qe health` report."""

    triton_live: bool
    triton_ready: bool
    dead: tuple[str, ...] = ()
    reason: str = ""

    @property
    def live(self) -> bool:
        """Worth keeping: the server answers and no part is dead (a dead stub never comes back by itself)."""
        return self.triton_live and not self.dead

    @property
    def ready(self) -> bool:
        """Worth sending requests to: every model loaded and every part's process alive."""
        return self.triton_ready and not self.dead

    def describe(self) -> str:
        if self.dead:
            return f"dead part process{'es' if len(self.dead) > 1 else ''}: {', '.join(self.dead)}"
        return self.reason or ("ready" if self.triton_ready else "live, not ready" if self.triton_live else "down")


def _get(http_url: str, path: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(http_url + path, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def expected_instances(http_url: str, timeout: float = 2.0) -> collections.Counter[str]:
    """The python-backend instances the loaded models have, by name (a name repeats once per GPU of its group),
    from the served configs: group `name`, `count`, `gpus` (Triton names instance k of a group `<name>_<k>`)."""
    status, body = _get(http_url, "/v2/models/stats", timeout)
    if status != 200:
        raise ServerError(f"{http_url}/v2/models/stats answered {status or 'nothing'}")
    models = sorted({s["name"] for s in json.loads(body).get("model_stats", [])})
    expected: collections.Counter[str] = collections.Counter()
    for model in models:
        status, body = _get(http_url, f"/v2/models/{model}/config", timeout)
        if status != 200:
            raise ServerError(f"{http_url}: the config of {model} answered {status or 'nothing'}")
        config = json.loads(body)
        if config.get("backend") != "python":
            continue
        for i, group in enumerate(config.get("instance_group", [])):
            devices = len(group.get("gpus", [])) if group.get("kind") == "KIND_GPU" else 1
            for k in range(int(group.get("count", 1))):
                expected[f"{group.get('name') or f'{model}_{i}'}_{k}"] += max(devices, 1)
    return expected


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in (PROC / str(pid) / "task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue  # a thread that ended
    return children


def _state(pid: int) -> str:
    """The process's state letter ('Z': a zombie); '' when it is gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def running_stubs(server_pid: int) -> dict[int, tuple[str, ...]]:
    """The server's live python-backend stub processes: pid → arguments (zombies left out)."""
    stubs = {}
    for pid in _children(server_pid):
        try:
            argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(STUB.encode()) and _state(pid) not in ("Z", "X", ""):
            stubs[pid] = tuple(a.decode(errors="replace") for a in argv[1:] if a)
    return stubs


def dead_instances(server_pid: int, expected: collections.Counter[str]) -> tuple[str, ...]:
    """The expected instances without a live stub under `server_pid`, sorted."""
    alive: collections.Counter[str] = collections.Counter()
    for argv in running_stubs(server_pid).values():
        alive.update(a for a in argv if a in expected)
    return tuple(sorted((expected - alive).elements()))


def server_pid_on_port(port: int) -> int:
    """The process listening on TCP `port` (the tritonserver whose HTTP that is), from /proc: `ServerError`
    when none is, or it is not this user's to read."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for proc in PROC.iterdir():
        if proc.name.isdigit() and inodes & _sockets(proc):
            return int(proc.name)
    raise ServerError(f"no process of this user listens on port {port}")


def _sockets(proc: Path) -> set[str]:
    """The links of the process's open files (`socket:[inode]` for a socket); those closing meanwhile left out."""
    links = set()
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:  # gone, or not this user's
        return links
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:
            continue
    return links


def probe(http_url: str, server_pid: int | None, expected: collections.Counter[str] | None = None) -> Health:
    """Triton's liveness and readiness at `http_url`, and its dead python-backend instances (none are looked for
    when `server_pid` is None). `expected`: the instances to look for (default: read from the server)."""
    live = _get(http_url, "/v2/health/live", 2.0)[0] == 200
    ready = live and _get(http_url, "/v2/health/ready", 2.0)[0] == 200
    if server_pid is None or not live:
        return Health(live, ready, reason="" if live else f"nothing answers at {http_url}")
    if expected is None:
        try:
            expected = expected_instances(http_url)
        except ServerError as e:
            return Health(live, False, reason=str(e))
    return Health(live, ready, dead_instances(server_pid, expected))
