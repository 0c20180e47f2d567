"""`d3qe serve`: a Triton Inference Server on an exported model repository, in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import LOOPBACK, Endpoints
from d3qe_serve.serving.rollout import read_key
from d3qe_serve.serving.server import DEFAULT_MAX_REQUEST_BYTES, STARTUP_TIMEOUT_S, TritonServer
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY
from d3qe_serve.serving.supervisor import Supervisor


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="written by `d3qe export`")
    p.add_argument(
        "--host", default=LOOPBACK, help="where gRPC and metrics listen (default: loopback); HTTP stays on loopback"
    )
    p.add_argument("--grpc-port", type=int, default=Endpoints.grpc_port)
    p.add_argument("--http-port", type=int, default=Endpoints.http_port)
    p.add_argument("--metrics-port", type=int, default=Endpoints.metrics_port)
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
    p.add_argument(
        "--model-control-key-file",
        type=Path,
        metavar="FILE",
        help="turn model control on (`d3qe rollout`) for callers holding the key in FILE (one word, mode 600); "
        "off by default. The key is checked by the gRPC front and never goes on a command line",
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=0,
        help="Triton's response cache on the entrances, this many MiB (0: none): a request equal to one answered "
        "before is answered from it; hits and misses in the metrics (nv_cache_num_hits_per_model)",
    )
    p.add_argument(
        "--no-supervise",
        action="store_true",
        help="do not watch the parts' processes: a dead one is then neither noticed nor healed (docs/reliability.md)",
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
        admin_key=read_key(args.model_control_key_file) if args.model_control_key_file else None,
        cache_bytes=round(args.cache_mb * 2**20) or None,
    )
    received: list[int] = []

    supervisor = None if args.no_supervise else Supervisor(server)

    def forward(signum, _frame) -> None:
        received.append(signum)
        if supervisor is not None:
            supervisor.request_stop()
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
            f"  model control {'on, for holders of the key' if args.model_control_key_file else 'off'}; response "
            f"cache {f'{args.cache_mb:g} MiB' if args.cache_mb else 'off'}\n"
            f"  supervision {'off' if supervisor is None else 'on: a dead part restarts the server'}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        if supervisor is not None and not supervisor.run():
            return 1  # a crash loop: the supervisor has said why and stopped the server
        rc = server.wait()
        if rc != 0:
            print(f"d3qe serve: tritonserver exited with code {rc}:\n{server.reason()}", file=sys.stderr)
        return rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
