"""`d3qe bench`: upstream-style eager fp32 vs each exported runtime in-process vs Triton over gRPC, in one run.

Every configuration scores the same encoded images from bytes (decode and preprocessing included), so
images/s compare end to end; each is also checked against the eager logits of the same images (max
|Δlogit|, verdict agreement). Served throughput is measured with 1, 4, 16 and 64 concurrent clients,
each sending one image per request (the server's dynamic batcher forms the batches). Results go to
`benchmarks/results/<machine>-<date>/` (under the working directory) as bench.json, bench.md and bench.png.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.benchmarks import Results, exported_weights, results_dir, save_figure, weights_record
from d3qe_serve.client.grpc_client import DEFAULT_MODEL, RGB, AsyncD3QEClient, RetryPolicy
from d3qe_serve.client.results import DEFAULT_THRESHOLD
from d3qe_serve.contract import IMAGE_ENTRANCE, LOGIT
from d3qe_serve.serving.host import machine, machine_slug, tool_versions
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest

MAX_ERRORS = 5  # distinct failure reasons kept per served row


@dataclass(frozen=True)
class Profile:
    """Sizes chosen so that a run finishes in minutes on the machine it is meant for."""

    device: str
    images: int  # distinct images; every configuration scores all of them
    # upstream's eval batches its DataLoader; each size is measured and the fastest is the reference ("× eager")
    eager_batches: tuple[int, ...]
    runtime_batch: int
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    min_requests: int = 16  # per concurrency level: max(min_requests, clients), images reused in turn
    warmup: int = 2  # untimed forward passes (or requests) before each configuration
    # In-process decoding threads, one batch ahead of the forward pass (as the served `preprocess` instances run
    # beside the parts); None: every core. The CPU profile decodes in line: its cores are the forward pass's.
    decoders: int | None = None


PROFILES = {
    "cpu": Profile(device="cpu", images=16, eager_batches=(1, 4), runtime_batch=1, decoders=1),
    "gpu": Profile(device="cuda", images=512, eager_batches=(32,), runtime_batch=32, min_requests=512, warmup=8),
}


@dataclass
class Row:
    """One configuration's measurement."""

    name: str
    runtime: str
    precision: str
    batch_policy: str
    images: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first distinct reasons of the failed requests
    max_abs_dlogit: float | None = None
    verdict_agreement: float | None = None
    # served: where a request's time went, per model (`time_profile`)
    time_profile: dict[str, dict[str, float]] | None = field(default=None, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def summary(self, eager_ips: float) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        return dict(
            d,
            images_per_s=self.images_per_s,
            vs_eager=self.images_per_s / eager_ips,
            p50_ms=self.percentile(50),
            p90_ms=self.percentile(90),
            p99_ms=self.percentile(99),
        )

    def compare(self, logits: np.ndarray, eager: np.ndarray, threshold: float) -> None:
        """Parity with eager on the same images (NaN where an image failed)."""
        ok = ~np.isnan(logits)
        self.failed = int((~ok).sum())
        if ok.any():
            self.max_abs_dlogit = float(np.abs(logits[ok] - eager[ok]).max())
            prob = 1 / (1 + np.exp(-logits[ok]))
            eager_prob = 1 / (1 + np.exp(-eager[ok]))
            self.verdict_agreement = float(np.mean((prob > threshold) == (eager_prob > threshold)))


def synthetic_images(n: int, seed: int = 0) -> list[bytes]:
    """Deterministic test images shaped like ARForensics: JPEG photos of ImageNet sizes and square PNG generations."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (256, 256), (384, 384), (512, 512), (640, 480)]
    images = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # smooth colour fields plus noise: structure at several scales, like photos, not flat noise
        low = rng.random((h // 32 + 2, w // 32 + 2, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        out = io.BytesIO()
        img.save(out, format="PNG" if w == h else "JPEG", quality=90)
        images.append(out.getvalue())
    return images


def timed_batches(
    images: list[bytes],
    batch: int,
    warmup: int,
    forward: Callable[[np.ndarray], np.ndarray],
    desc: str,
    sync=None,
    decoders: int | None = None,
) -> tuple[float, list[float], np.ndarray]:
    """Decode + forward over `images` in batches: wall seconds, per-image latency (ms), logits.

    With `decoders` > 1 (None: every core) a thread pool decodes the next batch while this one runs; a batch's
    latency is then from its turn to its logits. With 1, each batch is decoded in line, then run.
    """
    from d3qe_serve.d3qe import preprocess

    def pixels(image: bytes) -> np.ndarray:
        return preprocess(image).numpy()

    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    threads = decoders or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:

        def decode(chunk: list[bytes]) -> Callable[[], np.ndarray]:
            """The batch's pixels, when asked: decoded then (one thread), or already started on the pool."""
            if threads == 1:
                return lambda: np.stack([pixels(image) for image in chunk])
            started = [pool.submit(pixels, image) for image in chunk]
            return lambda: np.stack([f.result() for f in started])

        def run(decoded: Callable[[], np.ndarray]) -> np.ndarray:
            out = forward(decoded())
            if sync:
                sync()
            return out

        for _ in range(warmup):
            run(decode(chunks[0]))
        for size in sorted({len(c) for c in chunks} - {len(chunks[0])}):  # a short last batch: its shapes too
            run(decode(next(c for c in chunks if len(c) == size)))
        logits, latencies = [], []
        start = time.perf_counter()
        ahead = decode(chunks[0])
        for k in tqdm(range(len(chunks)), desc=desc, unit="batch", file=sys.stderr):
            t0 = time.perf_counter()
            current, ahead = ahead, decode(chunks[k + 1]) if k + 1 < len(chunks) else None
            logits.append(run(current).reshape(-1))
            latencies += [1000 * (time.perf_counter() - t0)] * len(chunks[k])
    return time.perf_counter() - start, latencies, np.concatenate(logits)


def bench_eager(model, images: list[bytes], profile: Profile, batch: int) -> tuple[Row, np.ndarray]:
    """Eager fp32 held to IEEE fp32 on a GPU (`cuda_fp32`: torch's default lets cuDNN convolutions run in TF32)."""
    import torch

    from d3qe_serve.serving.runtimes import cuda_fp32

    device = torch.device(profile.device)
    model = model.to(device)

    def forward(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), cuda_fp32():
            return model(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    seconds, lat, logits = timed_batches(
        images, batch, profile.warmup, forward, f"eager fp32, batch {batch}", sync, profile.decoders
    )
    name = f"eager (upstream-style), batch {batch}"
    row = Row(name, "pytorch eager", "fp32", f"batch {batch}", len(images), seconds, lat)
    return row, logits


def bench_parts(repo: Path, images: list[bytes], profile: Profile, compile: bool = False) -> tuple[Row, np.ndarray]:
    """The exported parts chained in-process, as the Triton python-backend models run them; `compile`: torch-runtime
    parts through torch.compile (CUDA graphs on a GPU), as `d3qe export --compile` serves them."""
    from d3qe_serve.serving.inprocess import load_exported, run_parts

    manifest = Manifest.read(repo)
    runners = load_exported(repo, profile.device, compile=compile)

    def forward(pixels: np.ndarray) -> np.ndarray:
        return run_parts(runners, pixels)[LOGIT]

    runtime, precision = manifest.describe()
    if compile:
        runtime += " compiled"
    desc = f"{repo.name}: {runtime} {precision}"
    seconds, lat, logits = timed_batches(
        images, profile.runtime_batch, profile.warmup, forward, desc, decoders=profile.decoders
    )
    batch = f"batch {profile.runtime_batch}"
    name = f"in-process {repo.name}" + (" (compiled)" if compile else "")
    return Row(name, runtime, precision, batch, len(images), seconds, lat), logits


async def bench_server_level(
    url: str, model: str, images: list[bytes], clients: int, requests: int, warmup: int, timeout: float, repo: Path
) -> tuple[Row, np.ndarray]:
    """`clients` concurrent callers, each sending one image per request until `requests` are done. A model that
    takes decoded pixels (`d3qe_rgb`) gets each image decoded here, before the clock starts."""
    logits = np.full(len(images), np.nan)
    latencies: list[float] = []
    errors: dict[str, None] = {}  # distinct, in order
    next_request = iter(range(requests))
    bar = tqdm(total=requests, desc=f"triton gRPC {model} ×{clients}", unit="req", file=sys.stderr)
    async with AsyncD3QEClient(url, model, concurrency=clients, timeout=timeout, retry=RetryPolicy(attempts=3)) as c:
        info = await c.wait_until_ready(timeout)
        payloads: list[bytes] | list[np.ndarray] = images
        if info.input == RGB:
            from PIL import Image

            payloads = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
        for i in range(warmup):
            await c.score_batch([(f"warmup{i}", payloads[i % len(images)])])

        async def caller() -> None:
            for i in next_request:
                j = i % len(images)
                t0 = time.perf_counter()
                (result,) = await c.score_batch([(f"image{j}", payloads[j])])
                latencies.append(1000 * (time.perf_counter() - t0))
                if result.ok:
                    logits[j] = result.logit
                elif len(errors) < MAX_ERRORS:
                    errors[str(result.error)] = None
                bar.update()

        before = model_statistics(url)
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(clients)))
        seconds = time.perf_counter() - start
        profile = time_profile(before, model_statistics(url))
    bar.close()
    runtime, precision = Manifest.read(repo).describe()
    policy = f"1 image/request ({info.input}), dynamic batching"
    name = f"triton gRPC {repo.name}" + ("" if model == DEFAULT_MODEL else f" {model}") + f", {clients} clients"
    row = Row(name, f"triton + {runtime}", precision, policy, requests, seconds, latencies, time_profile=profile)
    row.errors = list(errors)
    return row, logits


def fastest_eager(rows: list[Row]) -> Row:
    """The eager row at its best batch size: the reference of every "× eager"."""
    return max((r for r in rows if r.runtime == "pytorch eager"), key=lambda r: r.images_per_s)


async def warm_every_batch(url: str, max_batch: int, timeout: float) -> None:
    """One request of each batch size 1..`max_batch` through the encoded-image entrance, one at a time, so that
    each GPU part has run every batch shape its dynamic batcher may form (on a GPU, a new shape compiles kernels
    and picks cuDNN plans) before a timed window. Small PNGs: the parts see the model's size whatever the file's,
    and 2,080 images (max batch 64) decode in seconds."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3))).save(buf, format="PNG")
    async with AsyncD3QEClient(url, IMAGE_ENTRANCE, concurrency=1, timeout=timeout) as c:
        await c.wait_until_ready(timeout)
        for size in tqdm(range(1, max_batch + 1), desc="warm-up, every batch size", unit="batch", file=sys.stderr):
            await c.score_batch([(f"warm{size}-{i}", buf.getvalue()) for i in range(size)])


def admitted(policy: dict, model: str) -> int | None:
    """Clients a gate serves without refusing any (`server_policy`'s record of it): its queue's size; None where
    the model has no queue policy. Its nominal capacity is instances × max batch in the ensemble + the queue, but
    answered clients send again before their instance takes its next batch, and those requests queue beside the
    others: the tiny export's gates (2 × 4 + 64) refused requests at 72 clients and at 68 ("Exceeds maximum queue
    size"). With no more clients than the queue holds, nothing is refused."""
    cfg = policy.get(model)
    queue = ((cfg or {}).get("dynamic_batching") or {}).get("default_queue_policy", {}).get("max_queue_size")
    return None if not cfg or queue is None else int(queue)  # protobuf's JSON writes 64-bit integers as strings


def concurrency_levels(levels: Sequence[int], limit: int | None) -> tuple[list[int], list[int]]:
    """The client counts to measure and those left out: above the gate's admission a client's requests are
    refused and retried, so such a row would measure the admission policy; the limit itself is measured."""
    if limit is None:
        return sorted(set(levels)), []
    over = sorted({c for c in levels if c > limit})
    return sorted({c for c in levels if c <= limit} | ({limit} if over else set())), over


def model_statistics(url: str) -> dict[str, dict[str, int]]:
    """Each served model's cumulative counters (Triton's statistics extension): requests, executions, batched
    inferences and nanoseconds per phase (queue, compute input/infer/output, and success: the whole request)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        stats = c.get_inference_statistics(as_json=True)
    counters: dict[str, dict[str, int]] = {}
    for m in stats.get("model_stats", []):
        phases = m.get("inference_stats", {})
        record = {"requests": int(phases.get("success", {}).get("count", 0))}
        record["executions"] = int(m.get("execution_count", 0))
        record["inferences"] = int(m.get("inference_count", 0))
        for phase in PHASES:
            record[f"{phase}_ns"] = int(phases.get(phase, {}).get("ns", 0))
        name = m["name"] if m.get("version") in (None, "", "1") else f"{m['name']}/{m['version']}"
        counters[name] = record
    return counters


PHASES = ("queue", "compute_input", "compute_infer", "compute_output", "success")


def time_profile(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Where a served request's time went between two `model_statistics` snapshots, per model that ran: requests,
    mean batch per execution, and ms per request waiting in its queue, computing (its batch's input, infer and
    output), and in the model in all (a gate's includes the ensemble it calls; an ensemble's, its steps and the
    hand-offs between them; an ensemble's compute is the sum of its steps', parallel branches included)."""
    profile = {}
    for name, now in after.items():
        d = {k: v - before.get(name, {}).get(k, 0) for k, v in now.items()}
        n = d["requests"]
        if n <= 0:
            continue
        profile[name] = {
            "requests": n,
            "mean_batch": d["inferences"] / d["executions"] if d["executions"] else float("nan"),
            "queue_ms": d["queue_ns"] / n / 1e6,
            "compute_ms": (d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]) / n / 1e6,
            "total_ms": d["success_ns"] / n / 1e6,
        }
    return profile


def server_policy(url: str, repo: Path) -> dict:
    """Each served model's instances and batching, as the server reports its config."""
    import tritonclient.grpc as grpcclient

    policy = {}
    with grpcclient.InferenceServerClient(url) as c:
        policy["tritonserver"] = c.get_server_metadata(as_json=True).get("version")
        for cfg_path in sorted(repo.glob("*/config.pbtxt")):
            cfg = c.get_model_config(cfg_path.parent.name, as_json=True)["config"]
            policy[cfg["name"]] = {
                "backend": cfg.get("backend") or cfg.get("platform"),
                "max_batch_size": cfg.get("max_batch_size", 0),
                "instance_group": cfg.get("instance_group", []),
                "dynamic_batching": cfg.get("dynamic_batching"),
                "parameters": {k: v.get("string_value") for k, v in cfg.get("parameters", {}).items()},
            }
    return policy


def write_report(out_dir: Path, report: dict, rows: list[Row], eager_ips: float, figure: bool = True) -> None:
    """bench.json and bench.md (atomically: a run killed while writing keeps the previous rows), and the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps(report, indent=1)), ("bench.md", markdown(report))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    if figure:
        try:
            plot(out_dir / "bench.png", rows, eager_ips, report["title"])
        except ImportError as e:  # a matplotlib built for numpy 2 under Triton's numpy 1.26: the rows stand alone
            print(f"bench.png not drawn: {e}", file=sys.stderr)


def markdown(report: dict) -> str:
    """The report as a table, one configuration a row, under the machine, versions, model and server policy."""
    m, v, ref = report["machine"], report["versions"], report["model"]
    head = [
        f"# {report['title']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores"
        + (f", {m['gpu']}" if "gpu" in m else ", CPU only")
        + f"; torch threads {m['torch_threads']}; load average at start {m['load_average_at_start']}. "
        f"Date {report['date']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Model: {ref['description']}. {report['images']} distinct images (synthetic, ARForensics-like sizes); "
        "parity is against eager fp32 on the same images.",
        *server_lines(report["server_batch_policy"]),
        "",
        "| configuration | runtime | precision | batch policy | images/s | × eager | p50 ms | p90 ms | p99 ms "
        "| max abs Δlogit | verdicts agree | failed |",
        "|---" * 12 + "|",
    ]
    lines = []
    for s in report["rows"]:  # Row.summary
        dlogit = "—" if s["max_abs_dlogit"] is None else f"{s['max_abs_dlogit']:.2e}"
        agree = "—" if s["verdict_agreement"] is None else f"{100 * s['verdict_agreement']:.1f} %"
        lines.append(
            f"| {s['name']} | {s['runtime']} | {s['precision']} | {s['batch_policy']} | {s['images_per_s']:.3f} "
            f"| {s['vs_eager']:.2f} | {s['p50_ms']:.0f} | {s['p90_ms']:.0f} | {s['p99_ms']:.0f} | {dlogit} "
            f"| {agree} | {s['failed']} |"
        )
    return "\n".join(head + lines + profile_lines(report["rows"])) + "\n"


def profile_lines(rows: list[dict]) -> list[str]:
    """Per served row, where a request's time went (`time_profile`), one model a line."""
    lines = []
    for s in rows:
        if not s.get("time_profile"):
            continue
        lines += [
            "",
            f"Where a request's time went, {s['name']} ({s['precision']}; client p50 {s['p50_ms']:.0f} ms):",
            "",
            "| model | requests | mean batch | queue ms | compute ms | in model ms |",
            "|---" * 6 + "|",
        ]
        for model, p in s["time_profile"].items():
            lines.append(
                f"| {model} | {p['requests']} | {p['mean_batch']:.2f} | {p['queue_ms']:.1f} | {p['compute_ms']:.1f} "
                f"| {p['total_ms']:.1f} |"
            )
    return lines


def server_lines(policy: dict) -> list[str]:
    """Each served model's instances, batching and threads, one line each."""
    lines = []
    for name, cfg in policy.items():
        if not isinstance(cfg, dict):
            lines.append(f"Server: Triton {cfg}.")
            continue
        if cfg["backend"] == "ensemble":
            lines.append(f"- `{name}` (ensemble): max batch {cfg['max_batch_size']}")
            continue
        instances = ", ".join(f"{g.get('count', 1)}× {g.get('kind', '')}" for g in cfg["instance_group"])
        batching = cfg["dynamic_batching"] or {}
        lines.append(
            f"- `{name}` ({cfg['backend']}): instances {instances}; max batch {cfg['max_batch_size']}; "
            f"dynamic batching {batching.get('preferred_batch_size', '—')} "
            f"within {batching.get('max_queue_delay_microseconds', 0)} µs; parameters {cfg['parameters'] or '—'}"
        )
    return lines


def plot(path: Path, rows: list[Row], eager_ips: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r.name for r in rows]
    y = np.arange(len(rows))
    ax1.barh(
        y, [r.images_per_s for r in rows], color=["#888" if r.runtime == "pytorch eager" else "#3a7" for r in rows]
    )
    ax1.axvline(eager_ips, color="k", ls="--", lw=1, label="eager fp32")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlabel("images/s (higher is better)")
    ax1.legend()
    for q, marker in ((50, "o"), (90, "s"), (99, "^")):
        ax2.scatter([r.percentile(q) for r in rows], y, marker=marker, label=f"p{q}")
    ax2.set_yticks(y, [""] * len(rows))
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel("latency per request (eager, in-process: per batch), ms (log)")
    ax2.legend()
    save_figure(fig, path, title, fontsize=12, dpi=120)


def bench(
    *,
    profile: Profile,
    weights: WeightOptions,
    repos: Sequence[Path] = (),
    url: str | None = None,
    models: Sequence[str] = (DEFAULT_MODEL,),
    server: bool = True,
    timeout: float = 600.0,
    compile: bool = False,
    serve_each: bool = False,
    in_process: bool = True,
    out: Path | None = None,
) -> Results:
    """Eager at each of the profile's batch sizes (the weights `repos[0]` was exported from, `exported_weights`;
    the fastest is the reference of "× eager"), each repository in-process, and unless not `server` the first
    repository served (each of them with `serve_each`; or the server at `url`) for each of `models` at each of
    the profile's client counts, with where a request's time went (`time_profile`); writes bench.json, bench.md
    and bench.png to `out` (default `results_dir`). `timeout`: seconds per request; `compile`: in-process
    torch-runtime parts through torch.compile; not `in_process`: the repositories are only served.

    bench.json and bench.md are rewritten after every row (a run stopped part way keeps what it measured), a
    server started here logs to triton.log beside them, each served model is warmed up at every batch size
    (`warm_every_batch`) and measured only at client counts its gate admits (`admitted`)."""
    import torch

    info = machine(profile.device)
    date = datetime.date.today().isoformat()
    out_dir = results_dir(info, out)
    images = synthetic_images(profile.images)
    threshold = DEFAULT_THRESHOLD

    reference = exported_weights(weights, repos[0] if repos else None)
    report = {
        "title": f"d3qe bench on {machine_slug(info)}, {date}",
        "date": date,
        "machine": info,
        "versions": tool_versions(commit=True),
        "model": weights_record(reference),
        "images": profile.images,
        "profile": asdict(profile),
        "repositories": [str(r) for r in repos],
        "eager_reference": None,
        "served_models": [],
        "compiled_in_process": compile,
        "server_batch_policy": {},
        "admission": {},
        "rows": [],
    }
    rows: list[Row] = []

    def record(row: Row, logits: np.ndarray) -> None:
        """The row, compared with eager, in the report and on disk at once (no plot until the end)."""
        row.compare(logits, eager_logits, threshold)
        rows.append(row)
        eager_row = fastest_eager(rows)
        report["eager_reference"] = eager_row.name
        report["rows"] = [r.summary(eager_row.images_per_s) for r in rows]
        write_report(out_dir, report, rows, eager_row.images_per_s, figure=False)

    model = reference.load()
    eager_logits = None
    for batch in profile.eager_batches:
        row, logits = bench_eager(model, images, profile, batch)
        eager_logits = logits if eager_logits is None else eager_logits
        record(row, logits)
    del model
    if profile.device == "cuda":
        torch.cuda.empty_cache()
    for repo in repos if in_process else ():
        record(*bench_parts(repo, images, profile, compile))
    policy: dict = {}
    for repo in (repos if serve_each and url is None else repos[:1]) if server else ():
        from d3qe_serve.serving.server import served

        out_dir.mkdir(parents=True, exist_ok=True)
        with (
            (out_dir / "triton.log").open("a") as log,
            served(url, repo, log=None if url else log) as (served_url, _),
        ):
            policy = policy or server_policy(served_url, repo)
            report |= {"server_batch_policy": policy, "served_models": list(models)}
            gate_batch = int(policy.get(IMAGE_ENTRANCE, {}).get("max_batch_size", 1))
            asyncio.run(warm_every_batch(served_url, gate_batch, timeout))
            for model_name in models:
                levels, over = concurrency_levels(profile.concurrency, admitted(policy, model_name))
                report["admission"][model_name] = {"admitted": admitted(policy, model_name), "left_out": over}
                for clients in levels:
                    requests = max(profile.min_requests, clients)
                    record(
                        *asyncio.run(
                            bench_server_level(
                                served_url, model_name, images, clients, requests, profile.warmup, timeout, repo
                            )
                        )
                    )
    write_report(out_dir, report, rows, fastest_eager(rows).images_per_s)
    return Results.written(report, out_dir, "bench.json", "bench.md", "bench.png")
