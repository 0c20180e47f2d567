"""A real Triton Inference Server on a model repository, supervised: `TritonServer` and `served`.

The installation comes from `serving.install`, the command line from `serving.server_config.ServerConfig`,
the process is a `serving.process.SupervisedProcess`; `d3qe serve` is `cli/serve.py`.

tritonserver 2.51 has no request-size option (it takes gRPC messages up to 2 GiB), so clients reach
gRPC through `serving.grpc_front.GrpcFront`, which refuses requests above `max_request_bytes` and never
cancels a call to Triton; Triton's own gRPC and HTTP endpoints listen on loopback only (HTTP is used
for readiness). `max_request_bytes=None` (`d3qe serve --max-request-mb 0`) serves Triton's gRPC
directly, unbounded, on the given host.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO

from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import LOOPBACK, Endpoints, free_endpoints, free_ports, port_in_use
from d3qe_serve.serving.grpc_front import AdminKey, GrpcFront
from d3qe_serve.serving.install import (
    ServerInstall,
    find_tritonserver,
    prepare_backend_directory,
    server_environment,
)
from d3qe_serve.serving.process import SupervisedProcess
from d3qe_serve.serving.rollout import live_models
from d3qe_serve.serving.server_config import ADMIN_HEADER, GRPC_HEADER_PREFIX, ServerConfig

STARTUP_TIMEOUT_S = 600.0  # the full model's five python-backend processes each import torch and load weights
STOP_TIMEOUT_S = 60.0
SHM_DIR = Path("/dev/shm")
# A request of the gates' max batch (8) of large photos fits; `d3qe.preprocess.MAX_IMAGE_BYTES` bounds each image.
DEFAULT_MAX_REQUEST_BYTES = 128 << 20

_LOG_REASON = re.compile(r"^(E\d{4} |error:|.*UNAVAILABLE:)")
_CPU_ONLY_NOISE = "CudaDriverHelper has not been initialized"  # logged as an error by every start without a GPU


class TritonServer:
    """A tritonserver process on `model_repository`, listening on `endpoints`.

    `with TritonServer(repo, free_endpoints()) as server:` starts it, waits until every model is ready
    and stops it on exit (SIGTERM, then SIGKILL to its process group after `STOP_TIMEOUT_S`). The server's
    log goes to `log` (a file or stream; default: kept in memory, its tail is in every `ServerError`).
    `binary`: a tritonserver to run instead of the one `find_tritonserver` finds. `shared_memory`: let
    clients register shared-memory regions (see `serving.server_config` before turning it on).
    `max_request_bytes`: the gRPC front's limit (None: no front, see the module's docstring).
    `admin_key`: the operator's key that opens model control (`serving.rollout`), checked by the gRPC front
    and never passed to tritonserver (None: model control off). `cache_bytes`: the size of Triton's response
    cache (None: no cache). A repository a rollout has changed loads only its live models.
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
        admin_key: str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.endpoints = endpoints or Endpoints()
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.shared_memory = shared_memory
        self.max_request_bytes = max_request_bytes
        self.cache_bytes = cache_bytes
        self._admin_key = admin_key
        self._triton_key = secrets.token_urlsafe(24)  # Triton's restricted header's value: nobody is told it
        self._front: GrpcFront | None = None
        self._triton_grpc = self.endpoints.grpc_port  # replaced by a private loopback port behind the front
        # The python backend's IPC regions in /dev/shm carry this prefix: removed if the server dies without doing it.
        self.shm_prefix = f"d3qe_triton_{secrets.token_hex(6)}_"
        self._log = log
        self._process: SupervisedProcess | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._install: ServerInstall | None = None
        self._backends: Path | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def models(self) -> list[str]:
        """The models it serves: the live ones (`serving.rollout`), else every model of the repository."""
        live = live_models(self.model_repository)
        return sorted(live or (p.parent.name for p in self.model_repository.glob("*/config.pbtxt")))

    def config(self, backend_directory: Path) -> ServerConfig:
        """The server's options: Triton's gRPC on loopback behind the front (on the endpoints' host without
        one), HTTP on loopback, metrics on the endpoints' host; the restricted APIs' value drawn for this server;
        explicit model control where asked for or where a rollout has been, loading the live models."""
        e = self.endpoints
        return ServerConfig(
            self.model_repository,
            admin_key=self._triton_key,
            grpc_address=e.host if self._front is None else LOOPBACK,
            grpc_port=self._triton_grpc,
            http_address=LOOPBACK,
            http_port=e.http_port,
            metrics_address=e.host,
            metrics_port=e.metrics_port,
            backend_directory=backend_directory,
            shared_memory=self.shared_memory,
            shm_region_prefix=self.shm_prefix,
            model_control=self._admin_key is not None,
            load_models=live_models(self.model_repository),
            cache_bytes=self.cache_bytes,
            # the local cache's library: the wheel's (pytriton/tritonserver/caches), the container's /opt/tritonserver
            cache_directory=self._install.backends.parent / "caches" if self._install is not None else None,
        )

    def start(self) -> TritonServer:
        if self._process is not None:
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
        if self._admin_key is not None and self.max_request_bytes is None:
            raise ServerError(
                "model control needs the gRPC front (a request limit): the front checks the key, which never goes on "
                "tritonserver's command line; give --max-request-mb above 0"
            )
        install = find_tritonserver(self.binary)
        if self.max_request_bytes is not None:
            (self._triton_grpc,) = free_ports(LOOPBACK, 1)
            admin = AdminKey(GRPC_HEADER_PREFIX + ADMIN_HEADER, self._triton_key, self._admin_key)
            upstream = f"{LOOPBACK}:{self._triton_grpc}"
            self._front = GrpcFront(e.host, e.grpc_port, upstream, self.max_request_bytes, admin)
        self._workdir = tempfile.TemporaryDirectory(prefix="d3qe-triton-")
        self._install = install
        self._backends = prepare_backend_directory(install, Path(self._workdir.name) / "backends")
        try:
            self._launch()
        except ServerError:
            self._workdir.cleanup()
            self._workdir = None
            raise
        try:
            self._wait_ready()
            if self._front is not None:
                self._start_front()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        process = SupervisedProcess(
            [str(self._install.binary), *self.config(self._backends).arguments()],
            env=server_environment(self._install),
            sinks=[self._log] if self._log is not None else [],
            die_with_parent=True,
        )
        try:
            self._process = process.start()
        except OSError as error:
            raise ServerError(f"cannot run {self._install.binary}: {error}") from error

    def restart(self) -> None:
        """A new tritonserver in place of this one (running or dead), on the same ports and behind the same gRPC
        front, ready when this returns (`ServerError` if it does not become ready): what `serving.supervisor`
        heals with. The old one's process group is killed at once: a graceful stop would not help the requests
        in flight (Triton unloads every model first and answers NOT_FOUND meanwhile, and with a dead part it
        waits out its exit timeout), while a killed server's calls fail UNAVAILABLE at the front, which clients
        retry, as they do while the new one loads."""
        if self._process is None:
            raise ServerError("server not started")
        self._process.signal_group(signal.SIGKILL)
        self._process.wait()
        self._remove_shm()
        self._launch()
        self._wait_ready()

    def _start_front(self) -> None:
        """Clients can connect once the models are ready."""
        try:
            self._front.start()
        except RuntimeError as e:
            raise ServerError(str(e)) from e

    def reason(self) -> str:
        """The server's error lines (or its last lines when it logged none)."""
        lines = self._process.tail if self._process else []
        errors = [line for line in lines if _LOG_REASON.match(line) and _CPU_ONLY_NOISE not in line]
        return "".join(errors[-20:] or lines[-20:]).rstrip()

    def _http(self, path: str, timeout: float = 2.0) -> bytes:
        with urllib.request.urlopen(self.endpoints.http_url + path, timeout=timeout) as r:
            return r.read()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                rc = self._process.wait()  # its last lines read
                raise ServerError(f"tritonserver exited with code {rc} while starting:\n{self.reason()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                self._http("/v2/health/ready")
                return
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.reason()}")
            time.sleep(0.25)

    def version(self) -> str:
        return json.loads(self._http("/v2"))["version"]

    def poll(self) -> int | None:
        """tritonserver's exit code, or None while it runs (or before it starts)."""
        return self._process.poll() if self._process is not None else None

    def send_signal(self, sig: int) -> None:
        if self._process is not None:
            self._process.send_signal(sig)

    def wait(self) -> int:
        assert self._process is not None
        rc = self._process.wait()
        self._finish()
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Graceful shutdown (Triton unloads the models, which ends their stub processes), then no leftovers."""
        if self._process is None:
            return None
        rc = self._process.stop(timeout)
        self._finish()
        return rc

    def _finish(self) -> None:
        self._process.signal_group(signal.SIGKILL)  # stubs of a server that died abruptly are still in its group
        if self._front is not None:  # after Triton: calls it was still answering got their answers first
            self._front.stop()
            self._front = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        self._remove_shm()

    def _remove_shm(self) -> None:
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left by a killed server: memory until reboot
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def served(url: str | None, repo: Path, log: IO[str] | None = None) -> Iterator[tuple[str, TritonServer | None]]:
    """The given server's gRPC URL (and no server), or one started on `repo` on free loopback ports for the duration,
    its log to `log` (default: kept in memory, its tail in every `ServerError`)."""
    if url:
        yield url, None
        return
    with TritonServer(repo, free_endpoints(), log=log) as server:
        yield server.endpoints.grpc_url, server
