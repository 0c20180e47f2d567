"""`d3qe serve`: run a real Triton Inference Server on a model repository, and a context manager for it.

The server binary comes from the `nvidia-pytriton` wheel (or a `tritonserver` on PATH). The wheel ships
its Python backend without a stub in the backend folder: the stub for this Python is copied beside it.
The stub embeds libpython and finds its prefix through the `python3` on PATH, so the server is launched
with this interpreter's bin folder first on PATH: python-backend models then import this environment's
packages (`d3qe`, `serving`, onnxruntime).

Secure by default: every endpoint on loopback; model control off (`--model-control-mode=none`); the
model-repository, logging and trace APIs, and system/CUDA shared memory, restricted to a header whose
value is a random secret nobody is told, which switches them off. Shared memory is off because
tritonserver 2.51 lets a client register any region under /dev/shm, the python backend's own IPC
regions included (their names are listed there): opt in (`shared_memory=True`, `d3qe serve
--shared-memory`) only where every client is trusted.

tritonserver 2.51 has no request-size option (it takes gRPC messages up to 2 GiB), so clients reach
gRPC through `serving.grpc_front.GrpcFront`, which refuses requests above `max_request_bytes` and never
cancels a call to Triton; Triton's own gRPC and HTTP endpoints listen on loopback only (HTTP is used
for readiness). `max_request_bytes=None` (`d3qe serve --max-request-mb 0`) serves Triton's gRPC
directly, unbounded, on the given host.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

from d3qe_serve.errors import ServerError
from d3qe_serve.serving.grpc_front import GrpcFront

# Where `d3qe export` writes and `d3qe serve` reads, relative to the working directory (`build/` is the
# checkout's ignored folder; the package `model_repository/` holds the models' code, not an export).
DEFAULT_REPOSITORY = Path("build") / "model_repository"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 600.0  # the full model's five python-backend processes each import torch and load weights
STOP_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1
SHM_DIR = Path("/dev/shm")
# A request of the gates' max batch (8) of large photos fits; `d3qe.preprocess.MAX_IMAGE_BYTES` bounds each image.
DEFAULT_MAX_REQUEST_BYTES = 128 << 20
# Server APIs a client of this service never needs; `shared-memory` too unless asked for (see above).
RESTRICTED_APIS = ("model-repository", "logging", "trace")


@dataclass(frozen=True)
class ServerInstall:
    """Where a tritonserver lives: its binary, the libraries it needs and its backends."""

    binary: Path
    library_dirs: tuple[Path, ...]
    backends: Path  # holds python/libtriton_python.so
    stubs: Path | None  # python_backend_stubs/<major.minor>/ (the pytriton wheel); None: the stub is in backends/python


@dataclass(frozen=True)
class Endpoints:
    host: str = LOOPBACK
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"  # always loopback: Triton's HTTP takes requests of any size

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def _install_of(binary: Path) -> ServerInstall:
    root = binary.resolve().parents[1]
    if (root / "python_backend_stubs").is_dir():  # the nvidia-pytriton wheel: <site>/pytriton/tritonserver/bin
        return ServerInstall(
            binary, (root.parents[1] / "nvidia_pytriton.libs",), root / "backends", root / "python_backend_stubs"
        )
    return ServerInstall(binary, (root / "lib",), root / "backends", None)  # NVIDIA's container: /opt/tritonserver


def find_tritonserver(binary: str | Path | None = None) -> ServerInstall:
    """`binary` if given; else the nvidia-pytriton wheel's server if installed, else a `tritonserver` on PATH."""
    if binary is not None:
        binary = Path(binary)
        if not binary.is_file() or not os.access(binary, os.X_OK):
            why = "not an executable file" if binary.exists() else "no such file"
            raise ServerError(f"no tritonserver at {binary}: {why}")
        return _install_of(binary)
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        wheel_binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
        if wheel_binary.is_file():
            return _install_of(wheel_binary)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _install_of(Path(on_path))
    raise ServerError(
        "no tritonserver found: install the nvidia-pytriton wheel (pip install nvidia-pytriton==0.7.0, "
        "it bundles the server) or put a tritonserver binary on PATH"
    )


def prepare_backend_directory(install: ServerInstall, dest: Path) -> Path:
    """A `--backend-directory` whose python backend has the stub for this Python; returns it."""
    backend = install.backends / "python"
    if not (backend / "libtriton_python.so").is_file():
        raise ServerError(f"{backend} has no libtriton_python.so: this tritonserver has no Python backend")
    if install.stubs is None:
        if not (backend / "triton_python_backend_stub").is_file():
            raise ServerError(f"{backend} has no triton_python_backend_stub")
        return install.backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in install.stubs.iterdir() if p.is_dir())
        raise ServerError(f"no Python backend stub for Python {version} in {install.stubs} (has {available})")
    out = dest / "python"
    out.mkdir(parents=True, exist_ok=True)
    for src in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
        shutil.copy2(src, out / src.name)
    return dest


def server_environment(install: ServerInstall) -> dict[str, str]:
    env = os.environ.copy()
    libs = [str(p) for p in install.library_dirs]
    # The stub links libpython3.X; the launching interpreter's own copy keeps its C extensions loadable.
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def port_in_use(host: str, port: int) -> bool:
    """Whether a socket listens on `port`. Connections of a server just killed (TIME_WAIT) do not count:
    tritonserver binds with SO_REUSEADDR, so a restart on the same ports works."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports the kernel reports free right now (another process may still take one)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_endpoints(host: str = LOOPBACK) -> Endpoints:
    """Three free ports on `host` (see `free_ports`)."""
    return Endpoints(host, *free_ports(host, 3))


_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved before fork: the child must not dlopen


def _die_with_parent() -> None:
    # A server outliving a killed client (a crashed test run) would hold ports and memory. Linux sends the
    # signal when the thread that started the server ends: start it from a thread that outlives it.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_LOG_REASON = re.compile(r"^(E\d{4} |error:|.*UNAVAILABLE:)")
_CPU_ONLY_NOISE = "CudaDriverHelper has not been initialized"  # logged as an error by every start without a GPU


class TritonServer:
    """A tritonserver process on `model_repository`, listening on `endpoints`.

    `with TritonServer(repo, free_endpoints()) as server:` starts it, waits until every model is ready
    and stops it on exit (SIGTERM, then SIGKILL to its process group after `STOP_TIMEOUT_S`). The server's
    log goes to `log` (a file or stream; default: kept in memory, its tail is in every `ServerError`).
    `binary`: a tritonserver to run instead of the one `find_tritonserver` finds. `shared_memory`: let
    clients register shared-memory regions (see the module's docstring before turning it on).
    `max_request_bytes`: the gRPC front's limit (None: no front, see the module's docstring).
    """

    def __init__(
        self,
        model_repository: str | Path,
        endpoints: Endpoints | None = None,
        *,
        log: IO[str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        binary: str | Path | None = None,
        shared_memory: bool = False,
        max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.endpoints = endpoints or Endpoints()
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.shared_memory = shared_memory
        self.max_request_bytes = max_request_bytes
        self._front: GrpcFront | None = None
        self._triton_grpc = self.endpoints.grpc_port  # replaced by a private loopback port behind the front
        # The python backend's IPC regions in /dev/shm carry this prefix: removed if the server dies without doing it.
        self.shm_prefix = f"d3qe_triton_{secrets.token_hex(6)}_"
        self._log = log
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._proc: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.model_repository.glob("*/config.pbtxt"))

    def _command(self, binary: Path, backend_directory: Path) -> list[str]:
        e = self.endpoints
        restricted = ",".join([*RESTRICTED_APIS, *([] if self.shared_memory else ["shared-memory"])])
        unused_key = f"{restricted}:d3qe-admin={secrets.token_urlsafe(24)}"  # held by no client: the APIs are off
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            "--model-control-mode=none",
            "--disable-auto-complete-config",  # configs are complete; auto-complete would start a stub per model
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--grpc-address={e.host if self._front is None else LOOPBACK}",
            f"--grpc-port={self._triton_grpc}",
            f"--http-address={LOOPBACK}",
            f"--http-port={e.http_port}",
            f"--metrics-address={e.host}",
            f"--metrics-port={e.metrics_port}",
            f"--grpc-restricted-protocol={unused_key}",
            f"--http-restricted-api={unused_key}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def start(self) -> TritonServer:
        if self._proc is not None:
            raise ServerError("server already started")
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run `d3qe export` first")
        if not self.models:
            raise ServerError(f"model repository {self.model_repository} has no model config: run `d3qe export` first")
        e = self.endpoints
        ports = (("gRPC", e.host, e.grpc_port), ("HTTP", LOOPBACK, e.http_port), ("metrics", e.host, e.metrics_port))
        for name, host, port in ports:
            if port_in_use(host, port):
                raise ServerError(f"{name} port {port} on {host} is in use (another server running?)")
        if int(metadata.version("numpy").split(".")[0]) >= 2:
            raise ServerError("the Python backend of tritonserver 2.51 needs numpy<2 (with 2.x inputs arrive empty)")
        install = find_tritonserver(self.binary)
        if self.max_request_bytes is not None:
            (self._triton_grpc,) = free_ports(LOOPBACK, 1)
            self._front = GrpcFront(e.host, e.grpc_port, f"{LOOPBACK}:{self._triton_grpc}", self.max_request_bytes)
        self._workdir = tempfile.TemporaryDirectory(prefix="d3qe-triton-")
        backends = prepare_backend_directory(install, Path(self._workdir.name) / "backends")
        try:
            self._proc = subprocess.Popen(
                self._command(install.binary, backends),
                env=server_environment(install),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # its own process group: Ctrl-C is forwarded, python stubs are reachable
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            self._workdir.cleanup()
            self._workdir = None
            raise ServerError(f"cannot run {install.binary}: {e}") from e
        self._reader = threading.Thread(target=self._pump_log, daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
            if self._front is not None:
                self._start_front()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_front(self) -> None:
        """Clients can connect once the models are ready."""
        try:
            self._front.start()
        except RuntimeError as e:
            raise ServerError(str(e)) from e

    def _pump_log(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._tail.append(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()

    def reason(self) -> str:
        """The server's error lines (or its last lines when it logged none)."""
        lines = list(self._tail)
        errors = [line for line in lines if _LOG_REASON.match(line) and _CPU_ONLY_NOISE not in line]
        return "".join(errors[-20:] or lines[-20:]).rstrip()

    def _http(self, path: str, timeout: float = 2.0) -> bytes:
        with urllib.request.urlopen(self.endpoints.http_url + path, timeout=timeout) as r:
            return r.read()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                self._reader.join(timeout=5)
                raise ServerError(
                    f"tritonserver exited with code {self._proc.returncode} while starting:\n{self.reason()}"
                )
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                self._http("/v2/health/ready")
                return
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.reason()}")
            time.sleep(0.25)

    def version(self) -> str:
        return json.loads(self._http("/v2"))["version"]

    def send_signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def wait(self) -> int:
        assert self._proc is not None
        rc = self._proc.wait()
        self._finish()
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Graceful shutdown (Triton unloads the models, which ends their stub processes), then no leftovers."""
        if self._proc is None:
            return None
        self.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self._proc.wait()
        self._finish()
        return self._proc.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def _finish(self) -> None:
        self._kill_group()  # stubs of a server that died abruptly are still in its group
        if self._front is not None:  # after Triton: calls it was still answering got their answers first
            self._front.stop()
            self._front = None
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left by a killed server: memory until reboot
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def served(url: str | None, repo: Path) -> Iterator[tuple[str, TritonServer | None]]:
    """The given server's gRPC URL (and no server), or one started on `repo` on free loopback ports for the duration."""
    if url:
        yield url, None
        return
    with TritonServer(repo, free_endpoints()) as server:
        yield server.endpoints.grpc_url, server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="written by `d3qe export`")
    p.add_argument(
        "--host", default=LOOPBACK, help="where gRPC and metrics listen (default: loopback); HTTP stays on loopback"
    )
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds to wait for readiness")
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
        help="gRPC requests above this many MiB are refused (RESOURCE_EXHAUSTED); 0: no limit, Triton's gRPC directly",
    )
    p.add_argument("--tritonserver", type=Path, help="server binary (default: the nvidia-pytriton wheel's, or PATH)")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="let clients register system shared memory (`d3qe score --shared-memory`); only with trusted local "
        "clients: tritonserver 2.51 lets them map any /dev/shm region, the python backend's own included",
    )


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground; SIGINT/SIGTERM/SIGHUP go on to the server. Returns the server's exit code."""
    endpoints = Endpoints(args.host, args.grpc_port, args.http_port, args.metrics_port)
    server = TritonServer(
        args.model_repository,
        endpoints,
        log=sys.stderr,
        startup_timeout=args.startup_timeout,
        binary=args.tritonserver,
        shared_memory=args.shared_memory,
        max_request_bytes=round(args.max_request_mb * 2**20) or None,
    )
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        server.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            server.start()
        except ServerError as e:
            if received:
                print(f"d3qe serve: stopped by {signal.Signals(received[0]).name} while starting", file=sys.stderr)
                return 128 + received[0]
            print(f"d3qe serve: cannot start the server: {e}", file=sys.stderr)
            return 1
        print(
            f"d3qe serve: Triton {server.version()} ready (pid {server.pid}), models {', '.join(server.models)}\n"
            f"  repository  {server.model_repository}\n  gRPC        {endpoints.grpc_url}\n"
            f"  HTTP        {endpoints.http_url} (loopback only)\n  metrics     {endpoints.metrics_url}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        rc = server.wait()
        if rc != 0:
            print(f"d3qe serve: tritonserver exited with code {rc}:\n{server.reason()}", file=sys.stderr)
        return rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
