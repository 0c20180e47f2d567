"""The gRPC endpoint clients reach: a request-size limit in front of tritonserver.

tritonserver 2.51 has no option bounding a gRPC message: it takes up to 2 GiB, buffered whole.
`GrpcFront` listens where clients connect and forwards each call of `inference.GRPCInferenceService`
as opaque bytes to Triton's gRPC on a private loopback port:

- a request message above `max_request_bytes` is refused by gRPC itself, from the length in its header,
  with RESOURCE_EXHAUSTED ("Received message larger than max (N vs. LIMIT)"), and never reaches Triton;
- unary calls go to Triton without a deadline and are never cancelled: a client that gives up (deadline,
  cancel, disconnect) stops waiting and Triton finishes the request. Triton before 24.12 has a race in
  its cancellation handling that can crash it (triton-inference-server/server#7840); it did not show
  here in 800 expired deadlines, but no cancellation of ours will find it;
- `ModelStreamInfer` (bidirectional streaming) is forwarded message by message, each under the same
  limit; closing a stream from the client ends it, a cancelled stream is cancelled at Triton too;
- Triton's error status and message come back unchanged;
- the restricted APIs' header (model control, `serving.server_config`) reaches Triton only from a client
  holding the operator's key (`AdminKey`), with Triton's own value in place of it; from anyone else it is
  dropped, and Triton refuses the call.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
UNLIMITED = -1
# Call metadata that belongs to this hop's transport, not to the call Triton sees.
_TRANSPORT_METADATA = ("grpc-", ":", "user-agent")


@dataclass(frozen=True)
class AdminKey:
    """The restricted APIs' header (`header`, as Triton's gRPC reads it): a client sending the operator's `key`
    (read from a file) is forwarded with Triton's own value `upstream` (drawn for each start); `key` None: nobody
    holds one. The keys never print (`repr`)."""

    header: str
    upstream: str = field(repr=False)
    key: str | None = field(default=None, repr=False)

    def forwarded(self, key: str, value: str | bytes) -> tuple[str, str | bytes] | None:
        """The header as Triton gets it, or None (dropped)."""
        if key != self.header:
            return key, value
        given = value.encode() if isinstance(value, str) else value
        if self.key is not None and hmac.compare_digest(given, self.key.encode()):
            return key, self.upstream
        return None


def _forwarded(metadata, admin: AdminKey | None = None) -> tuple[tuple[str, str | bytes], ...]:
    pairs = ((m.key, m.value) for m in metadata or () if not m.key.startswith(_TRANSPORT_METADATA))
    return tuple(p for p in (admin.forwarded(*p) if admin else p for p in pairs) if p is not None)


class GrpcFront:
    """Listens on `host:port`, forwards to Triton's gRPC at `upstream` (see the module docstring).

    `start()` returns once the port is bound (`RuntimeError` naming the address if it cannot be); `stop()`
    waits up to `grace` seconds for calls still being answered.
    """

    def __init__(
        self, host: str, port: int, upstream: str, max_request_bytes: int, admin: AdminKey | None = None
    ) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.address = f"{host}:{port}"
        self.upstream = upstream
        self.max_request_bytes = max_request_bytes
        self.admin = admin
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._channel: grpc.aio.Channel | None = None
        self._calls: set[asyncio.Future] = set()  # upstream calls, referenced until they end (see _unary)
        self._grace = 5.0

    def start(self, timeout: float = 30.0) -> GrpcFront:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="grpc-front", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"gRPC front on {self.address} did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"gRPC front cannot listen on {self.address}: {self._error}") from self._error
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self._thread is None:
            return
        self._grace = grace
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=2 * grace + 10)
        self._thread = None

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._channel = grpc.aio.insecure_channel(
            self.upstream,
            options=[
                ("grpc.max_send_message_length", UNLIMITED),
                ("grpc.max_receive_message_length", UNLIMITED),
                # a restarted Triton (serving.supervisor) reached within a second, not after gRPC's backoff (to 120 s)
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_send_message_length", UNLIMITED),
                ("grpc.so_reuseport", 0),  # a port another server holds must fail here, not be shared
            ]
        )
        handlers = {
            m.name: (
                grpc.stream_stream_rpc_method_handler(self._stream(f"/{SERVICE.full_name}/{m.name}"))
                if m.client_streaming
                else grpc.unary_unary_rpc_method_handler(self._unary(f"/{SERVICE.full_name}/{m.name}"))
            )
            for m in SERVICE.methods
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
        try:
            server.add_insecure_port(self.address)
            await server.start()
        except Exception as e:  # handed to start()'s caller
            self._error = e
            self._started.set()
            await self._channel.close()
            return
        self._started.set()
        await self._stopping.wait()
        await server.stop(self._grace)
        if self._calls:  # answers nobody waits for any more: let Triton finish them, briefly
            await asyncio.wait(self._calls, timeout=self._grace)
        await self._channel.close()

    def _call_ended(self, call: asyncio.Future) -> None:
        self._calls.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: a failure nobody waited for is not an asyncio warning

    def _unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        stub = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = _forwarded(context.invocation_metadata(), self.admin)
            call = asyncio.ensure_future(stub(request, metadata=metadata))
            self._calls.add(call)
            call.add_done_callback(self._call_ended)
            try:
                # shield: if the client goes away this handler is cancelled, the call to Triton is not
                return await asyncio.shield(call)
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return forward

    def _stream(self, method: str) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        stub = self._channel.stream_stream(method)

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = stub(requests, metadata=_forwarded(context.invocation_metadata(), self.admin))
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return forward
