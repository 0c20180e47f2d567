"""`d3qe soak`: good and bad requests mixed, at a fixed rate for a bounded time; every request accounted for.

Requests go out open-loop at `--rate` per second for `--seconds` (loopback; at most `--max-outstanding`
unanswered), a `--bad-fraction` of them drawn from the bad cases of `cases()` (every kind of untrusted
input the server must refuse, each with the error it must give), the rest from the good ones (images,
odd-but-valid images, tensors), whose scores must equal the ones the server gives each of them alone
before the load. The bad cases assume `d3qe serve`'s defaults (the gRPC front's request-size limit). A
rate above capacity makes the gates refuse the excess. Then the answers are drained (`--drain-timeout`)
and every request is counted once:

    answered    scored, with the case's own score             refused     a bad case, with its own error
    rejected    overload (UNAVAILABLE from a gate's queue)    unexpected  any other answer (a good case failing, ...)
    wrong       scored, but not with the case's score          lost        no answer at all
    duplicated  answered more than once

The soak passes (`accounted_for`; `d3qe soak` exits 1 otherwise) when wrong, unexpected, duplicated and lost
are all 0. Results (counts, errors by kind, latencies, a per-second timeline, the server's memory when the soak
started it) go to `benchmarks/results/<machine>-<date>/` (under the working directory) as soak.json and soak.png.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from d3qe_serve.benchmarks import Results, results_dir
from d3qe_serve.benchmarks.bench import server_policy, synthetic_images
from d3qe_serve.contract import IMAGE_ENTRANCE, LOGIT, TENSOR_ENTRANCE, entrance, triton_dtype
from d3qe_serve.d3qe import preprocess
from d3qe_serve.d3qe.preprocess import MAX_IMAGE_BYTES, MAX_PIXELS
from d3qe_serve.errors import InputError
from d3qe_serve.serving.host import machine, machine_slug, tool_versions
from d3qe_serve.serving.server import DEFAULT_MAX_REQUEST_BYTES, SHM_DIR, TritonServer, served
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

SCORE_TOL = 1e-4  # the fixture's fp32 tolerance: batching with other requests may move a logit by ~1e-6
OVERLOAD = re.compile(r"Exceeds maximum queue size|Request timeout expired")
OUTCOMES = ("answered", "refused", "rejected", "wrong", "unexpected")


@dataclass
class Case:
    """One request: `expect` is None for a case that must be scored, else a regex its error must match,
    with gRPC status `status`."""

    kind: str
    model: str
    tensor: str
    datatype: str
    data: np.ndarray
    expect: str | None = None
    timeout_us: int | None = None  # a shorter queue limit than the gate's, asked by the client
    status: str = "StatusCode.INVALID_ARGUMENT"
    score: float | None = None  # the case's score when sent alone (good cases)

    def inputs(self) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput(self.tensor, list(self.data.shape), self.datatype)
        tensor.set_data_from_numpy(self.data)
        return [tensor]


def _image(data: bytes, count: int = 1) -> np.ndarray:
    return np.array([[data]] * count, dtype=np.object_)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decompression_bomb() -> bytes:
    """A PNG of zeros just over the pixel limit: ~100 KB that would decode to MAX_PIXELS+ bytes per channel."""
    side = int(MAX_PIXELS**0.5) + 1
    return _encode(Image.new("L", (side, side)), "PNG")


def cases(max_batch: int, workdir: Path) -> list[Case]:
    """Good cases and bad ones; `workdir` receives a real image whose path one bad case sends as the image."""
    photos = synthetic_images(4)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    on_disk = workdir / "real_image.png"
    on_disk.write_bytes(photos[2])
    pixels = preprocess(photos[0]).numpy()[None]

    def image(kind: str, data: bytes, expect: str | None = None, count: int = 1, **kw) -> Case:
        spec = entrance(IMAGE_ENTRANCE).input
        return Case(kind, IMAGE_ENTRANCE, spec.name, spec.triton_dtype, _image(data, count), expect, **kw)

    def tensor(kind: str, data: np.ndarray, expect: str | None = None) -> Case:
        """Sent as the dtype `data` has: the contract's (float32), or a wrong one the server must refuse."""
        name = entrance(TENSOR_ENTRANCE).input.name
        return Case(kind, TENSOR_ENTRANCE, name, triton_dtype(data.dtype), data, expect)

    over_size = rf"larger than max \(\d+ vs\. {DEFAULT_MAX_REQUEST_BYTES}\)"  # the gRPC front's refusal
    with_nan, with_inf = pixels.copy(), pixels.copy()
    with_nan[0, 1, 100:110, 100:110] = np.nan
    with_inf[0, 2, 0, 0] = np.inf
    return [
        *(image(f"photo {i}", p) for i, p in enumerate(photos)),
        image("photo, 1 s queue limit", photos[1], timeout_us=1_000_000),
        image("CMYK JPEG", _encode(rgb.convert("CMYK"), "JPEG")),
        image("16-bit PNG", _encode(rgb.convert("L").convert("I;16"), "PNG")),
        image("animated GIF (first frame)", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        tensor("pixels", pixels),
        image("empty", b"", "empty image"),
        image("text file", b"name,score\nimage.png,0.5\n", "not a decodable image"),
        image("truncated JPEG", photos[1][: len(photos[1]) // 2], "truncated or corrupt"),
        image("1x1 PNG", _encode(Image.new("RGB", (1, 1)), "PNG"), "below the minimum"),
        image("decompression bomb", decompression_bomb(), "pixel limit|decompression bomb"),
        image("file path as the image", str(on_disk).encode(), "not a decodable image"),
        image("over-size image", bytes(MAX_IMAGE_BYTES + 1), "byte limit"),
        image("over-size request", bytes(DEFAULT_MAX_REQUEST_BYTES), over_size, status="StatusCode.RESOURCE_EXHAUSTED"),
        image("too many images", photos[0], rf"batch-size must be <= {max_batch}", count=max_batch + 1),
        tensor("NaN pixels", with_nan, "NaN or infinity"),
        tensor("Inf pixels", with_inf, "NaN or infinity"),
        tensor("0-255 pixels", pixels * 255, r"must lie in \[0, 1\]"),
        tensor("FP64 pixels", pixels.astype(np.float64), "FP64"),
        tensor("224x224 pixels", pixels[..., :224, :224].copy(), "unexpected shape"),
    ]


def classify(case: Case, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> str:
    """The outcome (one of OUTCOMES) of one answer to `case`."""
    if error is not None:
        status, message = error.status(), error.message()
        if status == "StatusCode.UNAVAILABLE" and OVERLOAD.search(message):
            return "rejected"
        if case.expect and status == case.status and re.search(case.expect, message):
            return "refused"
        return "unexpected"
    if case.expect is not None:
        return "unexpected"  # scored, but should have been refused
    if case.score is None:
        return "answered"  # the reference pass itself
    logit = result.as_numpy(LOGIT)
    return "answered" if logit.size == 1 and abs(float(logit.item()) - case.score) <= SCORE_TOL else "wrong"


def score_alone(client: grpcclient.InferenceServerClient, good: list[Case]) -> None:
    """Each good case's score, sent alone to an idle server: what it must be scored under load."""
    for case in good:
        case.score = float(client.infer(case.model, case.inputs()).as_numpy(LOGIT).item())


@dataclass
class Record:
    case: int
    sent: float
    answers: list[tuple[float, str, str]] = field(default_factory=list)  # (time, outcome, error message)


class Ledger:
    """Every request sent and every answer received, thread-safe."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.outstanding = 0  # requests without an answer yet
        self.lock = threading.Condition()

    def sent(self, case: int) -> int:
        with self.lock:
            self.records.append(Record(case, time.monotonic()))
            self.outstanding += 1
            return len(self.records) - 1

    def answer(self, i: int, case: Case, result, error) -> None:
        outcome = classify(case, result, error)
        with self.lock:
            answers = self.records[i].answers
            answers.append((time.monotonic(), outcome, error.message() if error else ""))
            self.outstanding -= len(answers) == 1
            self.lock.notify_all()

    def wait(self, until: float, predicate) -> bool:
        with self.lock:
            return self.lock.wait_for(predicate, timeout=max(0.0, until - time.monotonic()))


class MemorySampler:
    """The server's memory every second, in MiB: each process's own (anonymous) memory, summed per model's stubs,
    and the python backend's shared-memory regions. Counted once each, unlike a sum of RSS."""

    SHM = "shared memory"

    def __init__(self, server: TritonServer) -> None:
        self.server, self.samples = server, []  # (seconds, {part: MiB})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, float]:
        parts: collections.Counter = collections.Counter()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) != self.server.pid:
                    continue
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ProcessLookupError):
                continue  # the process ended meanwhile
            model = next((Path(a).parts[-3] for a in argv if a.endswith("/1/model.py")), "tritonserver")
            parts[model] += int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon")))
        parts[self.SHM] = sum(f.stat().st_size for f in SHM_DIR.glob(f"{self.server.shm_prefix}*")) // 1024
        return {k: round(v / 1024, 1) for k, v in sorted(parts.items())}

    def total(self, sample: dict[str, float]) -> float:
        return round(sum(sample.values()), 1)

    def summary(self) -> dict:
        first, peak, last = (
            self.samples[0][1],
            max(self.samples, key=lambda s: self.total(s[1]))[1],
            self.samples[-1][1],
        )
        return {
            "total": {"start": self.total(first), "peak": self.total(peak), "end": self.total(last)},
            "by_part": {
                k: {"start": first.get(k), "peak": max(s.get(k, 0) for _, s in self.samples), "end": last.get(k)}
                for k in last
            },
        }

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(1.0):
            self.samples.append((round(time.monotonic() - start, 1), self.sample()))

    def __enter__(self) -> MemorySampler:
        self.samples.append((0.0, self.sample()))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Load:
    """How the soak sends: `rate` requests/s for `seconds`, a `bad_fraction` of them bad cases (drawn with
    `seed`), at most `max_outstanding` unanswered; then up to `drain_timeout` seconds waiting for answers."""

    seconds: float = 180.0
    rate: float = 20.0
    bad_fraction: float = 0.3
    max_outstanding: int = 512
    drain_timeout: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.seconds <= 0 or not 0 <= self.bad_fraction <= 1:
            raise InputError("need --rate > 0, --seconds > 0 and --bad-fraction in [0, 1]")


def soak(url: str, all_cases: list[Case], load: Load) -> tuple[Ledger, float]:
    """Send for `load.seconds`, then drain; returns the ledger and the seconds the sender waited on the client
    bound."""
    rng = np.random.default_rng(load.seed)
    good = [i for i, c in enumerate(all_cases) if c.expect is None]
    bad = [i for i, c in enumerate(all_cases) if c.expect is not None]
    ledger, throttled = Ledger(), 0.0
    with grpcclient.InferenceServerClient(url) as client:
        start = time.monotonic()
        end = start + load.seconds
        n = 0
        while (due := start + n / load.rate) < end:
            time.sleep(max(0.0, due - time.monotonic()))
            if ledger.outstanding >= load.max_outstanding:
                t = time.monotonic()
                ledger.wait(end, lambda: ledger.outstanding < load.max_outstanding)
                throttled += time.monotonic() - t
                if time.monotonic() >= end:
                    break
            k = int(rng.choice(bad if rng.random() < load.bad_fraction else good))
            case = all_cases[k]
            i = ledger.sent(k)
            # No client deadline: a cancelled call crashes this tritonserver (server#7840). `timeout` is the
            # server's queue limit for the request, not a deadline.
            client.async_infer(
                case.model, case.inputs(), functools.partial(ledger.answer, i, case), timeout=case.timeout_us
            )
            n += 1
        ledger.wait(time.monotonic() + load.drain_timeout, lambda: ledger.outstanding == 0)
    return ledger, throttled


def summarize(ledger: Ledger, all_cases: list[Case], seconds: float) -> dict:
    counts = collections.Counter({o: 0 for o in OUTCOMES})
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latency: dict[str, list[float]] = collections.defaultdict(list)
    timeline: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    start = ledger.records[0].sent if ledger.records else 0.0
    duplicated = lost = 0
    with ledger.lock:
        for r in ledger.records:
            timeline[int(r.sent - start)]["sent"] += 1
            if not r.answers:
                lost += 1
                by_kind[all_cases[r.case].kind]["lost"] += 1
                continue
            duplicated += len(r.answers) > 1
            t, outcome, message = r.answers[0]
            counts[outcome] += 1
            latency[outcome].append(t - r.sent)
            timeline[int(t - start)][outcome] += 1
            by_kind[all_cases[r.case].kind][f"{outcome}: {message[:160]}" if message else outcome] += 1
    sent = len(ledger.records)
    # from the first request to the last answer: the drain after sending stopped is part of the work
    elapsed = max((r.answers[0][0] - start for r in ledger.records if r.answers), default=0.0)
    return {
        "sent": sent,
        **counts,
        "duplicated": duplicated,
        "lost": lost,
        "sent_per_s": round(sent / seconds, 2),
        "elapsed_s": round(elapsed, 1),
        "answered_per_s": round(counts["answered"] / elapsed, 2) if elapsed else 0.0,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "latency_s": {
            o: {f"p{q}": round(float(np.percentile(v, q)), 3) for q in (50, 90, 99)} | {"max": round(max(v), 3)}
            for o, v in latency.items()
        },
        "timeline": [{"second": s, **timeline[s]} for s in range(max(timeline, default=-1) + 1)],
    }


def plot(path: Path, summary: dict, memory: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    seconds = [row["second"] for row in summary["timeline"]]
    for outcome in ("sent", *OUTCOMES):
        ax.plot(seconds, [row.get(outcome, 0) for row in summary["timeline"]], label=outcome, lw=1)
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("requests per second")
    ax.legend(loc="upper left")
    if memory:
        mem = ax.twinx()
        mem.plot(*zip(*memory, strict=True), color="k", ls="--", lw=1)
        mem.set_ylabel("server memory, MiB (dashed)")
        mem.set_ylim(bottom=0)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(report: dict) -> list[str]:
    """The report's counts, rates, outcomes by kind, latencies and the server's memory, as lines to print."""
    summary, memory = report["counts"], report["server_memory_mib"]
    keys = ("sent", "answered", "rejected", "refused", "wrong", "unexpected", "duplicated", "lost")
    lines = [
        "  ".join(f"{k} {summary[k]}" for k in keys),
        f"{summary['sent_per_s']} requests/s sent; {summary['answered_per_s']} scored/s over the "
        f"{summary['elapsed_s']} s from the first request to the last answer",
        "by kind (refused: the error message):",
    ]
    for kind, outcomes in summary["by_kind"].items():
        lines.append(f"  {kind}: " + "; ".join(f"{o}: {n}" for o, n in outcomes.items()))
    for outcome, lat in summary["latency_s"].items():
        lines.append(f"  latency {outcome}: " + ", ".join(f"{k} {v:.3f} s" for k, v in lat.items()))
    if memory:
        lines.append(f"server memory, MiB (anonymous per process + shared-memory regions): {memory['total']}")
        for part, mib in memory["by_part"].items():
            lines.append(f"  {part}: " + ", ".join(f"{k} {v}" for k, v in mib.items()))
    return lines


def accounted_for(report: dict) -> bool:
    """Every request answered once, as its case must be: no wrong, unexpected, duplicated or lost request."""
    return all(report["counts"][k] == 0 for k in ("wrong", "unexpected", "duplicated", "lost"))


def run_soak(
    *, load: Load = Load(), repository: Path = DEFAULT_REPOSITORY, url: str | None = None, out: Path | None = None
) -> Results:
    """The soak (`load`) on the server at `url`, else on one started on `repository` (whose memory is then
    sampled); writes soak.json and soak.png to `out` (default `results_dir`). `accounted_for` says whether it
    passed."""
    info = machine("cpu")
    date = datetime.date.today().isoformat()
    out_dir = results_dir(info, out)
    with (
        served(url, repository) as (grpc_url, server),
        grpcclient.InferenceServerClient(grpc_url) as client,
        tempfile.TemporaryDirectory(prefix="d3qe-soak-") as workdir,
    ):
        all_cases = cases(client.get_model_config(IMAGE_ENTRANCE).config.max_batch_size, Path(workdir))
        score_alone(client, [c for c in all_cases if c.expect is None])
        print(f"d3qe soak: {load.rate:g} requests/s for {load.seconds:g} s on {grpc_url}, {len(all_cases)} cases")
        memory = MemorySampler(server) if server else None  # only a server this soak started is measured
        with memory or contextlib.nullcontext():
            ledger, throttled = soak(grpc_url, all_cases, load)
        policy = server_policy(grpc_url, server.model_repository) if server else {}
    summary = summarize(ledger, all_cases, load.seconds)
    memory_summary = memory.summary() if memory else None
    report = {
        "title": f"d3qe soak on {machine_slug(info)}, {date}",
        "date": date,
        "machine": info,
        "versions": tool_versions(commit=True),
        "settings": {
            "model_repository": str(repository),
            "url": url,
            **dataclasses.asdict(load),
            "out": None if out is None else str(out),
        },
        "client_waited_s": round(throttled, 1),
        "server_policy": policy,
        "server_memory_mib": memory_summary,
        "counts": summary,
        "memory_timeline": memory.samples if memory else [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        out_dir / "soak.png",
        summary,
        [(t, memory.total(m)) for t, m in memory.samples] if memory else [],
        report["title"],
    )
    return Results.written(report, out_dir, "soak.json", "soak.png")
