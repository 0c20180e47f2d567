"""`d3qe health`: is the tritonserver on this machine ready (or live), every part's process included?

The probe of `deploy/`'s pods (an exec probe: Triton's own `/v2/health/ready` stays true with a dead part,
see `serving.health`) and the check `d3qe serve`'s supervision makes. Exit 0: yes; 1: no, with the reason on
stderr. The server is the process listening on `--http-port` (on this machine: run it in the server's pod).
"""

from __future__ import annotations

import argparse
import sys

from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import LOOPBACK, Endpoints
from d3qe_serve.serving.health import probe, server_pid_on_port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=Endpoints.http_port, help="Triton's HTTP port on loopback")
    p.add_argument(
        "--live",
        action="store_true",
        help="liveness instead of readiness: the server answers and no part is dead (a loading server is live)",
    )


def run(args: argparse.Namespace) -> int:
    url = f"http://{LOOPBACK}:{args.http_port}"
    try:
        pid = server_pid_on_port(args.http_port)
    except ServerError as e:
        print(f"d3qe health: not {'live' if args.live else 'ready'}: {e}", file=sys.stderr)
        return 1
    health = probe(url, pid)
    ok = health.live if args.live else health.ready
    if not ok:
        print(f"d3qe health: not {'live' if args.live else 'ready'}: {health.describe()}", file=sys.stderr)
    return 0 if ok else 1
