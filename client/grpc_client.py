"""gRPC client for the `d3qe` ensembles on Triton: sync (`D3QEClient`) and asyncio (`AsyncD3QEClient`).

They talk to either entrance that takes images: `d3qe` (IMAGE, encoded files: bytes or paths) or
`d3qe_rgb` (RGB, decoded uint8 pixels [H, W, 3], sent as they are: nothing is re-encoded). Both batch
images into requests (an RGB request holds images of one size), keep a bounded number of requests in
flight, give each request a timeout, retry UNAVAILABLE with capped exponential backoff, and return one
`ScoreResult` per image in input order, with what produced it: the manifest id and threshold the server's
gate answers with (the verdict uses that threshold unless the caller gives one). A request that fails for
any other reason is split in halves until the failing image is alone, so one bad image fails only
itself. The retry/split policy is written once, as a generator of steps (`_score_batch`) that the sync
and the async client each drive with their own I/O.

The per-request timeout is the client's alone: past it the client stops waiting and reports the images
as timed out, but does not cancel the call. A cancelled gRPC call can crash Triton before 24.12 (a race
in its cancellation handling, fixed by triton-inference-server/server#7840; the server here is 2.51 =
24.10), so no deadline is sent, and `close()` waits (up to `drain_timeout`) for calls still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

from d3qe_serve.client.evidence import Evidence, EvidenceError, fetch_evidence
from d3qe_serve.client.results import Item, ScoreResult, provenance
from d3qe_serve.contract import (
    EVIDENCE_ENTRANCE,
    IMAGE,
    IMAGE_ENTRANCE,
    LOGIT,
    MANIFEST_ID,
    PROB,
    PROVENANCE,
    RGB,
    RGB_ENTRANCE,
    THRESHOLD,
    entrance,
)
from d3qe_serve.errors import ModelMismatchError, ServerNotReadyError

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = IMAGE_ENTRANCE  # encoded image files; RGB_ENTRANCE takes decoded pixels
# What this client sends and reads, as the contract's two image entrances declare it: the image input by
# name (IMAGE: BYTES, RGB: UINT8), and the scores.
INPUTS = {e.input.name: e.input for e in map(entrance, (IMAGE_ENTRANCE, RGB_ENTRANCE))}
# LOGIT, PROB; and what produced them, which a server of before issue 23 does not answer (then None)
OUTPUTS = tuple(t for t in entrance(IMAGE_ENTRANCE).outputs if t.name not in PROVENANCE)

RETRY_STATUS = "StatusCode.UNAVAILABLE"  # server down or restarting: the same request may succeed later
# Failures of the whole request, not of one image in it: splitting the batch cannot isolate anything.
BATCH_WIDE_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED", "StatusCode.NOT_FOUND"}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: `attempts` tries in all, sleeping initial·multiplier^k seconds (capped) between."""

    attempts: int = 5
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_backoff)
            delay *= self.multiplier


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    max_batch_size: int
    input: str = IMAGE  # IMAGE or RGB


# An image ready to send: encoded file bytes (IMAGE) or uint8 pixels [H, W, 3] (RGB).
Payload = bytes | np.ndarray


@dataclass(frozen=True)
class _Infer:
    """Step: send these (source, payload) pairs as one request; the driver sends back the result or the exception."""

    batch: list[tuple[str, Payload]]


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Step = _Infer | _Sleep
_Outcome = grpcclient.InferResult | InferenceServerException | None


def _read_item(item: Item, image_input: str) -> tuple[str, Payload] | ScoreResult:
    """(source, path) → (source, file bytes); a file that cannot be read, or an image of the kind the model does
    not take (pixels for IMAGE, a file for RGB), becomes its failed result."""
    source, data = item
    if isinstance(data, np.ndarray) != (image_input == RGB):
        kind = "decoded pixels (an array)" if isinstance(data, np.ndarray) else "an encoded file"
        wanted = "RGB uint8 pixels" if image_input == RGB else "encoded image files"
        return ScoreResult.failed(source, f"got {kind}; this model takes {wanted}")
    if isinstance(data, np.ndarray) and data.dtype != np.uint8:  # as `d3qe.preprocess` words it in-process
        return ScoreResult.failed(source, f"RGB pixels must be uint8 (0-255), got {data.dtype}")
    if isinstance(data, bytes | np.ndarray):
        return source, data
    try:
        return source, Path(data).read_bytes()
    except OSError as e:
        return ScoreResult.failed(source, f"cannot read image file: {e.strerror or e}")


def _score_batch(
    items: list[Item], retry: RetryPolicy, timeout: float, threshold: float | None, image_input: str = IMAGE
) -> Generator[_Step, _Outcome, list[ScoreResult]]:
    """One batch's policy: read files, send, retry UNAVAILABLE, split on per-image errors. Results in input order.
    `threshold`: the verdicts' (None: the one the server answers with, upstream's 0.5 where it does not say)."""
    results: list[ScoreResult | None] = []
    pending: list[list[tuple[int, str, Payload]]] = [[]]
    for i, item in enumerate(items):
        read = _read_item(item, image_input)
        results.append(read if isinstance(read, ScoreResult) else None)
        if not isinstance(read, ScoreResult):
            pending[0].append((i, *read))
    while pending:
        batch = pending.pop(0)
        if not batch:
            continue
        delays = retry.delays()
        while True:
            outcome = yield _Infer([(s, b) for _, s, b in batch])
            if not isinstance(outcome, InferenceServerException):
                answered = zip(batch, *_outputs(outcome, len(batch)), strict=True)
                for (i, source, _), logit, prob, manifest_id, served in answered:
                    chosen = threshold if threshold is not None else served
                    results[i] = ScoreResult.from_scores(source, float(logit), float(prob), chosen, manifest_id)
                break
            status = outcome.status() or ""  # none when the client itself refused the request
            if status == RETRY_STATUS:
                delay = next(delays, None)
                if delay is not None:
                    yield _Sleep(delay)
                    continue
                message = f"server unavailable after {retry.attempts} attempts: {outcome.message()}"
            elif status == "StatusCode.DEADLINE_EXCEEDED":
                message = f"request timed out after {timeout:g} s (batch of {len(batch)})"
            elif status not in BATCH_WIDE_STATUS and len(batch) > 1:
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                break
            else:
                kind = f"server error ({status.removeprefix('StatusCode.')})" if status else "request refused"
                message = f"{kind}: {outcome.message()}"
            for i, source, _ in batch:
                results[i] = ScoreResult.failed(source, message)
            break
    return results


def _outputs(result: grpcclient.InferResult, n: int) -> tuple[np.ndarray, np.ndarray, list, list[float]]:
    """The `n` items' LOGIT, PROB, manifest id (None where the server does not say) and threshold (upstream's
    where it does not say)."""
    logits, probs = result.as_numpy(LOGIT), result.as_numpy(PROB)
    if logits is None or probs is None or logits.size != n or probs.size != n:
        raise ModelMismatchError(f"expected {LOGIT} and {PROB} with {n} values each in the response")
    ids, thresholds = provenance(result.as_numpy(MANIFEST_ID), result.as_numpy(THRESHOLD), n)
    return logits.reshape(n), probs.reshape(n), ids, thresholds


def _check_metadata(metadata: dict, config: dict) -> ModelInfo:
    inputs = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
    outputs = {t["name"]: t["datatype"] for t in metadata.get("outputs", [])}
    name = metadata.get("name", "?")
    image_inputs = [n for n, t in INPUTS.items() if inputs == {n: t.triton_dtype}]
    if not image_inputs or any(outputs.get(t.name) != t.triton_dtype for t in OUTPUTS):
        wanted_inputs = " or ".join(f"{t.name}: {t.triton_dtype}" for t in INPUTS.values())
        wanted_outputs = ", ".join(f"{t.name}: {t.triton_dtype}" for t in OUTPUTS)
        raise ModelMismatchError(
            f"model {name!r} has inputs {inputs} and outputs {outputs}; expected {wanted_inputs} → {wanted_outputs}"
        )
    cfg = config.get("config", config)
    return ModelInfo(
        name,
        list(metadata.get("versions", [])),
        metadata.get("platform", ""),
        int(cfg.get("max_batch_size", 0)),
        image_inputs[0],
    )


def _shape(item: Item) -> tuple[int, ...] | None:
    return item[1].shape if isinstance(item[1], np.ndarray) else None


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive items, `size` at most a chunk; arrays of another shape start a new one (one request, one size)."""
    batch: list[Item] = []
    for item in items:
        if batch and _shape(item) != _shape(batch[0]):
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _nbytes(batch: list[tuple[str, Payload]]) -> int:
    """The request's image tensor in shared memory: raw pixels, or serialized BYTES (4-byte length each)."""
    return sum(p.nbytes if isinstance(p, np.ndarray) else 4 + len(p) for _, p in batch)


@dataclass
class _ShmSlot:
    """A system shared-memory region for one in-flight request's images, grown (re-registered) when too small."""

    name: str
    handle: object = None
    size: int = 0

    @property
    def key(self) -> str:
        return f"/{self.name}"

    def fits(self, batch: list[tuple[str, Payload]]) -> bool:
        return self.handle is not None and _nbytes(batch) <= self.size

    def grow(self, batch: list[tuple[str, Payload]]) -> None:
        """Replace the region by one that holds `batch` (the caller unregisters the old and registers the new)."""
        self.release()
        self.size = max(2 * _nbytes(batch), 1 << 20)
        self.handle = shm.create_shared_memory_region(self.name, self.key, self.size)

    def release(self) -> None:
        if self.handle is not None:
            shm.destroy_shared_memory_region(self.handle)
            self.handle = None


class _ClientBase:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        *,
        batch_size: int = 8,
        concurrency: int = 4,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        threshold: float | None = None,
        shared_memory: bool = False,
        drain_timeout: float = 600.0,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError(f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}")
        self.url, self.model = url, model
        self.batch_size, self.concurrency, self.timeout = batch_size, concurrency, timeout
        self.retry = retry or RetryPolicy()
        self.threshold = threshold
        self.shared_memory = shared_memory
        self.drain_timeout = drain_timeout
        self.max_batch_size: int | None = None  # from the model config, once checked
        self.input = IMAGE  # the model's image input, once checked
        prefix = f"d3qe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._slots = [_ShmSlot(f"{prefix}_{i}") for i in range(concurrency)] if shared_memory else []

    def _batches(self, items: Iterable[Item]) -> Iterator[list[Item]]:
        size = self.batch_size if self.max_batch_size is None else min(self.batch_size, max(self.max_batch_size, 1))
        return _chunks(items, size)

    def _plan(self, batch: list[Item]) -> Generator[_Step, _Outcome, list[ScoreResult]]:
        return _score_batch(batch, self.retry, self.timeout, self.threshold, self.input)

    def _inputs(self, batch: list[tuple[str, Payload]], slot: _ShmSlot | None = None) -> list[grpcclient.InferInput]:
        """The image tensor (IMAGE or RGB), in the request or (with `slot`, already fitted) in shared memory."""
        if self.input == RGB:  # _read_item let only arrays through, _chunks only of one shape
            data = np.stack([p for _, p in batch])
        else:
            data = np.array([[p] for _, p in batch], dtype=np.object_)
        if self.max_batch_size == 0:  # a model without batching takes one image, without the batch axis
            data = data[0]
        tensor = grpcclient.InferInput(self.input, list(data.shape), INPUTS[self.input].triton_dtype)
        if slot is None:
            tensor.set_data_from_numpy(data)
        elif self.input == RGB:
            shm.set_shared_memory_region(slot.handle, [np.ascontiguousarray(data)])
            tensor.set_shared_memory(slot.name, data.nbytes)
        else:
            serialized = serialize_byte_tensor(data)
            shm.set_shared_memory_region(slot.handle, [serialized])
            tensor.set_shared_memory(slot.name, serialized_byte_size(serialized))
        return [tensor]

    def _timed_out(self) -> InferenceServerException:
        return InferenceServerException(f"no answer within {self.timeout:g} s", status="StatusCode.DEADLINE_EXCEEDED")

    def score_paths(self, paths: Iterable[str | Path]) -> Iterator[ScoreResult] | AsyncIterator[ScoreResult]:
        """`score` over image files: an iterator of results (an async one from `AsyncD3QEClient`)."""
        return self.score((str(p), Path(p)) for p in paths)

    def _check_batching(self, info: ModelInfo) -> None:
        self.max_batch_size = info.max_batch_size
        self.input = info.input
        if info.max_batch_size == 0 and self.batch_size > 1:
            self.batch_size = 1


class D3QEClient(_ClientBase):
    """Synchronous client; `score` keeps `concurrency` batches in flight on a thread pool."""

    def __init__(self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, **kwargs) -> None:
        super().__init__(url, model, **kwargs)
        self._grpc = grpcclient.InferenceServerClient(url)
        self._free_slots: queue.Queue[_ShmSlot] = queue.Queue()
        for slot in self._slots:
            self._free_slots.put(slot)
        self._running: set[threading.Event] = set()  # calls not answered yet, timed out ones included

    def __enter__(self) -> D3QEClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for calls still running (closing the channel would cancel them), then free shared memory."""
        deadline = time.monotonic() + self.drain_timeout
        for done in list(self._running):
            done.wait(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            if slot.handle is not None:
                self._unregister(slot)
            slot.release()
        self._grpc.close()

    def _unregister(self, slot: _ShmSlot) -> None:
        with contextlib.suppress(InferenceServerException):  # a server that is gone holds no registration
            self._grpc.unregister_system_shared_memory(slot.name)

    def wait_until_ready(self, timeout: float = 60.0) -> ModelInfo:
        """Poll liveness, readiness and the model's readiness, then check its metadata."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                if (
                    self._grpc.is_server_live()
                    and self._grpc.is_server_ready()
                    and self._grpc.is_model_ready(self.model)
                ):
                    return self.model_info()
                last = f"model {self.model!r} not ready"
            except InferenceServerException as e:
                last = e.message()
            time.sleep(0.25)
        raise ServerNotReadyError(f"{self.url}: not ready after {timeout:g} s ({last})")

    def model_info(self) -> ModelInfo:
        """The model's metadata and batching, checked against the d3qe interface."""
        info = _check_metadata(
            self._grpc.get_model_metadata(self.model, as_json=True),
            self._grpc.get_model_config(self.model, as_json=True),
        )
        self._check_batching(info)
        return info

    def score(self, items: Iterable[Item]) -> Iterator[ScoreResult]:
        """(source, bytes or path) pairs → one result per image, in input order."""
        if self.max_batch_size is None:
            self.model_info()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="d3qe-client") as pool:
            in_flight: deque[Future[list[ScoreResult]]] = deque()
            for batch in self._batches(items):
                if len(in_flight) == self.concurrency:
                    yield from in_flight.popleft().result()
                in_flight.append(pool.submit(self._drive, self._plan(batch)))
            while in_flight:
                yield from in_flight.popleft().result()

    def score_batch(self, batch: list[Item]) -> list[ScoreResult]:
        """One request (split only if an image in it fails), in this thread: for callers timing requests."""
        return self._drive(self._plan(batch))

    def evidence(self, item: Item, model: str = EVIDENCE_ENTRANCE) -> Evidence:
        """One encoded image's score with a reviewer's evidence (`client.evidence`), from the evidence ensemble."""
        read = _read_item(item, IMAGE)
        if isinstance(read, ScoreResult):
            raise EvidenceError(f"{read.source}: {read.error}")
        return fetch_evidence(self._grpc, *read, model, self.threshold)

    def _drive(self, plan: Generator[_Step, _Outcome, list[ScoreResult]]) -> list[ScoreResult]:
        try:
            step = next(plan)
            while True:
                outcome: _Outcome = None
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                else:
                    try:
                        outcome = self._infer(step.batch)
                    except InferenceServerException as e:
                        outcome = e
                step = plan.send(outcome)
        except StopIteration as done:
            return done.value

    def _infer(self, batch: list[tuple[str, Payload]]) -> grpcclient.InferResult:
        slot = self._free_slots.get() if self._slots else None
        try:
            if slot is not None and not slot.fits(batch):
                if slot.handle is not None:
                    self._unregister(slot)
                slot.grow(batch)
                self._grpc.register_system_shared_memory(slot.name, slot.key, slot.size)
            inputs = self._inputs(batch, slot)
        except BaseException:
            if slot is not None:
                self._free_slots.put(slot)
            raise
        done, answer = threading.Event(), []

        def finished(result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
            answer.append((result, error))
            if slot is not None:  # the server has read the region: it may take the next batch
                self._free_slots.put(slot)
            self._running.discard(done)
            done.set()

        self._running.add(done)
        self._grpc.async_infer(self.model, inputs, finished)
        if not done.wait(self.timeout):
            raise self._timed_out()
        result, error = answer[0]
        if error is not None:
            raise error
        return result


class AsyncD3QEClient(_ClientBase):
    """asyncio client over `tritonclient.grpc.aio`; `score` is an async iterator, `concurrency` requests in flight."""

    def __init__(self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, **kwargs) -> None:
        super().__init__(url, model, **kwargs)
        self._grpc = grpcclient_aio.InferenceServerClient(url)
        self._free_slots: asyncio.Queue[_ShmSlot] | None = None
        self._running: set[asyncio.Task] = set()  # calls not answered yet, timed out ones included

    async def __aenter__(self) -> AsyncD3QEClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for calls still running (closing the channel would cancel them), then free shared memory."""
        if self._running:
            await asyncio.wait(self._running, timeout=self.drain_timeout)
        for slot in self._slots:
            if slot.handle is not None:
                await self._unregister(slot)
            slot.release()
        await self._grpc.close()

    async def _unregister(self, slot: _ShmSlot) -> None:
        with contextlib.suppress(InferenceServerException):  # a server that is gone holds no registration
            await self._grpc.unregister_system_shared_memory(slot.name)

    async def wait_until_ready(self, timeout: float = 60.0) -> ModelInfo:
        """Poll liveness, readiness and the model's readiness, then check its metadata."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                if (
                    await self._grpc.is_server_live()
                    and await self._grpc.is_server_ready()
                    and await self._grpc.is_model_ready(self.model)
                ):
                    return await self.model_info()
                last = f"model {self.model!r} not ready"
            except InferenceServerException as e:
                last = e.message()
            await asyncio.sleep(0.25)
        raise ServerNotReadyError(f"{self.url}: not ready after {timeout:g} s ({last})")

    async def model_info(self) -> ModelInfo:
        """The model's metadata and batching, checked against the d3qe interface."""
        info = _check_metadata(
            await self._grpc.get_model_metadata(self.model, as_json=True),
            await self._grpc.get_model_config(self.model, as_json=True),
        )
        self._check_batching(info)
        return info

    async def score(self, items: Iterable[Item]) -> AsyncIterator[ScoreResult]:
        """(source, bytes or path) pairs → one result per image, in input order."""
        if self.max_batch_size is None:
            await self.model_info()
        in_flight: deque[asyncio.Task[list[ScoreResult]]] = deque()
        try:
            for batch in self._batches(items):
                if len(in_flight) == self.concurrency:
                    for result in await in_flight.popleft():
                        yield result
                in_flight.append(asyncio.ensure_future(self._drive(self._plan(batch))))
            while in_flight:
                for result in await in_flight.popleft():
                    yield result
        finally:
            for task in in_flight:
                task.cancel()

    async def score_batch(self, batch: list[Item]) -> list[ScoreResult]:
        """One request (split only if an image in it fails): for callers timing requests."""
        return await self._drive(self._plan(batch))

    async def _drive(self, plan: Generator[_Step, _Outcome, list[ScoreResult]]) -> list[ScoreResult]:
        try:
            step = next(plan)
            while True:
                outcome: _Outcome = None
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                else:
                    try:
                        outcome = await self._infer(step.batch)
                    except InferenceServerException as e:
                        outcome = e
                step = plan.send(outcome)
        except StopIteration as done:
            return done.value

    async def _infer(self, batch: list[tuple[str, Payload]]) -> grpcclient.InferResult:
        if self._slots and self._free_slots is None:  # created here so that it belongs to the running loop
            self._free_slots = asyncio.Queue()
            for slot in self._slots:
                self._free_slots.put_nowait(slot)
        slot = await self._free_slots.get() if self._slots else None
        try:
            if slot is not None and not slot.fits(batch):
                if slot.handle is not None:
                    await self._unregister(slot)
                slot.grow(batch)
                await self._grpc.register_system_shared_memory(slot.name, slot.key, slot.size)
            call = asyncio.ensure_future(self._grpc.infer(self.model, self._inputs(batch, slot)))
        except BaseException:
            if slot is not None:
                self._free_slots.put_nowait(slot)
            raise
        self._running.add(call)

        def finished(task: asyncio.Task) -> None:
            if slot is not None:  # the server has read the region: it may take the next batch
                self._free_slots.put_nowait(slot)
            self._running.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved here too, for a call nobody awaits any more

        call.add_done_callback(finished)
        try:
            # shield: a timeout or a cancelled caller stops waiting, the call itself runs to its end
            return await asyncio.wait_for(asyncio.shield(call), self.timeout)
        except asyncio.TimeoutError:
            raise self._timed_out() from None
