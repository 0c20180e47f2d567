"""`d3qe serve`: run a real Triton Inference Server on a model repository, and a context manager for it.

The server binary comes from the `nvidia-pytriton` wheel (or a `tritonserver` on PATH). The wheel ships
its Python backend without a stub in the backend folder: the stub for this Python is copied beside it.
The stub embeds libpython and finds its prefix through the `python3` on PATH, so the server is launched
with this interpreter's bin folder first on PATH: python-backend models then import this environment's
packages (`d3qe`, `export`, onnxruntime).
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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 600.0  # the full model's five python-backend processes each import torch and load weights
STOP_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server could not be found, prepared or started; the message says why."""


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
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def find_tritonserver() -> ServerInstall:
    """The nvidia-pytriton wheel's server if installed, else a `tritonserver` on PATH (NVIDIA's container layout)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            libs = root.parents[1] / "nvidia_pytriton.libs"
            return ServerInstall(binary, (libs,), root / "backends", root / "python_backend_stubs")
    on_path = shutil.which("tritonserver")
    if on_path:
        root = Path(on_path).resolve().parents[1]
        return ServerInstall(Path(on_path), (root / "lib",), root / "backends", None)
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_endpoints(host: str = LOOPBACK) -> Endpoints:
    """Three distinct ports the kernel reports free right now (another process may still take one)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in socks:
            s.bind((host, 0))
        grpc, http, metrics = (s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()
    return Endpoints(host, grpc, http, metrics)


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
    Model control stays off (`--model-control-mode none`): clients cannot load or unload models.
    """

    def __init__(
        self,
        model_repository: str | Path,
        endpoints: Endpoints | None = None,
        *,
        log: IO[str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.endpoints = endpoints or Endpoints()
        self.startup_timeout = startup_timeout
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
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            "--model-control-mode=none",
            "--disable-auto-complete-config",  # configs are complete; auto-complete would start a stub per model
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--grpc-address={e.host}",
            f"--grpc-port={e.grpc_port}",
            f"--http-address={e.host}",
            f"--http-port={e.http_port}",
            f"--metrics-address={e.host}",
            f"--metrics-port={e.metrics_port}",
        ]

    def start(self) -> TritonServer:
        if self._proc is not None:
            raise ServerError("server already started")
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run `d3qe export` first")
        if not self.models:
            raise ServerError(f"model repository {self.model_repository} has no model config: run `d3qe export` first")
        e = self.endpoints
        for name, port in (("gRPC", e.grpc_port), ("HTTP", e.http_port), ("metrics", e.metrics_port)):
            if port_in_use(e.host, port):
                raise ServerError(f"{name} port {port} on {e.host} is in use (another server running?)")
        if int(metadata.version("numpy").split(".")[0]) >= 2:
            raise ServerError("the Python backend of tritonserver 2.51 needs numpy<2 (with 2.x inputs arrive empty)")
        install = find_tritonserver()
        self._workdir = tempfile.TemporaryDirectory(prefix="d3qe-triton-")
        backends = prepare_backend_directory(install, Path(self._workdir.name) / "backends")
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
        self._reader = threading.Thread(target=self._pump_log, daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="written by `d3qe export`")
    p.add_argument("--host", default=LOOPBACK, help="address all three endpoints listen on (default: loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds to wait for readiness")


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground; SIGINT/SIGTERM/SIGHUP go on to the server. Returns the server's exit code."""
    endpoints = Endpoints(args.host, args.grpc_port, args.http_port, args.metrics_port)
    server = TritonServer(args.model_repository, endpoints, log=sys.stderr, startup_timeout=args.startup_timeout)
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
            f"  HTTP        {endpoints.http_url}\n  metrics     {endpoints.metrics_url}\nCtrl-C stops it.",
            flush=True,
        )
        rc = server.wait()
        if rc != 0:
            print(f"d3qe serve: tritonserver exited with code {rc}:\n{server.reason()}", file=sys.stderr)
        return rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
