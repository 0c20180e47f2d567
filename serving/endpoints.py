"""Where a server listens: the three ports of `Endpoints`, and finding free ones on this machine."""

from __future__ import annotations

import socket
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Endpoints:
    """`host` (gRPC and metrics) and the three ports; the defaults are Triton's own."""

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
