"""`d3qe bench-rollout`: a rollout and a rollback under load, and the response cache, on a real tritonserver.

Rollout: two exports of seeded weights (`--preset`, seeds A and B) in a work folder; a served copy of A
with model control; `clients` threads each sending one image a request, without retries, for `steady_s`
seconds, then while B is rolled out, `steady_s` more, while A is rolled back, and `steady_s` more. Every
request is counted: sent, answered, failed (with the server's message), lost (neither). Every answer's logit
is compared with the eager model of the seed its manifest id names. Latency p50/p99 in steady state and while
swapping; the server's memory (the PSS of tritonserver and its stubs, sampled every 0.25 s) with one
generation loaded and at its peak while two are.

Cache: a stream of `cache_requests` single-image requests of which a share `repeat_share` repeats an image
sent before, by `clients` threads, on a server without a cache and on one with `--cache-mb`; latency and
throughput each, and the answers compared. Then the cache at its limit: a small cache filled with the
evidence entrance's answers (about 5 KB each) until it evicts: its utilisation, entries, evictions and the
server's RSS beside the one without a cache.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from d3qe_serve.benchmarks import Results, report_header, results_dir, save_figure
from d3qe_serve.contract import EVIDENCE_ENTRANCE, IMAGE, IMAGE_ENTRANCE, LOGIT, MANIFEST_ID
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.inprocess import WeightOptions, open_eager
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.rollout import rollback, rollout
from d3qe_serve.serving.server import TritonServer

LOGIT_TOL = 1e-3  # an fp32 export against eager (the tiny export validates at ~1e-4)


def noise_images(n: int, size: int = 256, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` distinct PNGs of seeded noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append((f"noise_{i:04d}.png", buf.getvalue()))
    return images


def _input(data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(IMAGE, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return tensor


def tree_rss(pid: int) -> int:
    """Memory of a process and all its descendants (Triton and its python-backend stubs): their proportional set
    size (PSS), each shared page counted once across them (the stubs share torch's and ONNX Runtime's libraries,
    which their RSS would count once per stub)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        seen.add(p)
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split() if int(c) not in seen]
        except OSError:
            continue
    return total


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), tree_rss(self.pid)))
            time.sleep(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self, start: float, end: float) -> int:
        return max((b for t, b in self.samples if start <= t <= end), default=0)


@dataclass
class Request:
    image: str
    sent: float
    latency: float | None = None
    logit: float | None = None
    manifest_id: str | None = None
    error: str | None = None


def _client_loop(url: str, images: list[tuple[str, bytes]], k: int, stop: threading.Event, out: list) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        i = k
        while not stop.is_set():
            name, data = images[i % len(images)]
            i += 1
            request = Request(name, time.monotonic())
            out.append(request)  # counted as sent before it goes
            try:
                r = client.infer(IMAGE_ENTRANCE, [_input(data)])
            except InferenceServerException as e:
                request.error = f"{e.status()}: {e.message()}"
                continue
            request.latency = time.monotonic() - request.sent
            request.logit = float(r.as_numpy(LOGIT).item())
            request.manifest_id = r.as_numpy(MANIFEST_ID).item().decode()


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0}
    a = np.array(latencies) * 1e3
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _export(out: Path, preset: str, seed: int) -> Path:
    """Seeded weights exported as `d3qe export --preset P --seed S` does (kept in `out` for the next run)."""
    from d3qe_serve.export.driver import export_model

    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        export_model(WeightOptions(preset=preset, seed=seed), out, log=lambda line: None)
    return out


def bench_rollout(
    *,
    preset: str = "tiny",
    seeds: tuple[int, int] = (0, 1),
    clients: int = 3,
    steady_s: float = 20.0,
    images: int = 8,
    cache_requests: int = 200,
    repeat_share: float = 0.5,
    cache_mb: float = 16.0,
    work: Path = Path("build") / "bench_rollout",
    out: Path | None = None,
) -> Results:
    """Measure (see the module's docstring); results as JSON + PNG in `out`."""
    info = machine()
    folder = results_dir(info, out)
    folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    exports = [_export(work / f"export_{preset}_seed{s}", preset, s) for s in seeds]
    ids = [Manifest.read(e).id for e in exports]
    pool = noise_images(images)
    truth = {}
    for manifest_id, seed in zip(ids, seeds, strict=True):
        score = open_eager(WeightOptions(preset=preset, seed=seed))
        truth[manifest_id] = {r.source: r.logit for r in score(pool)}
    report = report_header(f"rollout and rollback under load, response cache ({preset})", info)
    report["lscpu"] = _lscpu()
    report["rollout"] = _rollout_run(exports, ids, truth, pool, clients, steady_s, work)
    report["cache"] = _cache_run(exports[0], pool, clients, cache_requests, repeat_share, cache_mb, work)
    name = f"rollout-{preset}"
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, folder / f"{name}.png")
    return Results.written(report, folder, f"{name}.json", f"{name}.png")


def _lscpu() -> str | None:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None


def _rollout_run(exports, ids, truth, pool, clients, steady_s, work) -> dict:
    repo = work / "served"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(exports[0], repo)
    key = secrets.token_urlsafe(32)  # the server's model-control key, in this process only
    with TritonServer(repo, free_endpoints(), admin_key=key) as server:
        url = server.endpoints.grpc_url
        memory = MemorySampler(server.pid)
        memory.start()
        requests: list[Request] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client_loop, args=(url, pool, k, stop, requests), daemon=True)
            for k in range(clients)
        ]
        for t in threads:
            t.start()
        marks = {"start": time.monotonic()}
        for phase in tqdm(["steady_1", "rollout", "steady_2", "rollback", "steady_3"], desc="rollout bench"):
            if phase == "rollout":
                rollout(repo, exports[1], url=url, key=key)
            elif phase == "rollback":
                rollback(repo, url=url, key=key)
            else:
                time.sleep(steady_s)
            marks[phase] = time.monotonic()
        stop.set()
        for t in threads:
            t.join(timeout=600)
        memory.stop()
    bounds = {
        "steady_1": (marks["start"], marks["steady_1"]),
        "rollout": (marks["steady_1"], marks["rollout"]),
        "steady_2": (marks["rollout"], marks["steady_2"]),
        "rollback": (marks["steady_2"], marks["rollback"]),
        "steady_3": (marks["rollback"], marks["steady_3"]),
    }
    answered = [r for r in requests if r.latency is not None]
    failed = [r for r in requests if r.error is not None]
    wrong = [
        r for r in answered if r.manifest_id not in truth or abs(r.logit - truth[r.manifest_id][r.image]) > LOGIT_TOL
    ]
    phases = {}
    for phase, (a, b) in bounds.items():
        sent_in = [r for r in answered if a <= r.sent < b]
        phases[phase] = {
            "seconds": b - a,
            **_percentiles([r.latency for r in sent_in]),
            "answered_by": {i[:12]: sum(r.manifest_id == i for r in sent_in) for i in ids},
            "peak_rss_mb": memory.peak(a, b) / 2**20,
        }
    def sent_during(r: Request, names: tuple[str, ...]) -> bool:
        return any(bounds[p][0] <= r.sent < bounds[p][1] for p in names)

    steady = [r.latency for r in answered if sent_during(r, ("steady_1", "steady_2", "steady_3"))]
    swap = [r.latency for r in answered if sent_during(r, ("rollout", "rollback"))]
    return {
        "clients": clients,
        "exports": {i[:12]: str(e) for i, e in zip(ids, exports, strict=True)},
        "sent": len(requests),
        "answered": len(answered),
        "failed": len(failed),
        "lost": len(requests) - len(answered) - len(failed),
        "failures": sorted({r.error for r in failed}),
        "answers_not_equal_to_their_models_eager_logit": len(wrong),
        "logit_tolerance": LOGIT_TOL,
        "max_abs_logit_error": max((abs(r.logit - truth[r.manifest_id][r.image]) for r in answered), default=None),
        "steady": _percentiles(steady),
        "swap": _percentiles(swap),
        "p99_swap_over_steady": (_percentiles(swap).get("p99_ms", 0) / _percentiles(steady)["p99_ms"])
        if steady
        else None,
        "rss_mb_one_generation": phases["steady_1"]["peak_rss_mb"],
        "rss_mb_peak_two_generations": max(phases["rollout"]["peak_rss_mb"], phases["rollback"]["peak_rss_mb"]),
        "phases": phases,
        "timeline": [(r.sent - marks["start"], r.latency, (r.manifest_id or "")[:12] or None) for r in requests],
    }


def _stream(n: int, pool_size: int, repeat_share: float, seed: int = 1) -> list[int]:
    """`n` image indices: each a repeat of one sent before with probability `repeat_share`, else a new one."""
    rng = np.random.default_rng(seed)
    stream, fresh = [], 0
    for _ in range(n):
        if stream and rng.random() < repeat_share:
            stream.append(stream[rng.integers(len(stream))])
        else:
            stream.append(fresh % pool_size)
            fresh += 1
    return stream


def _cache_run(export, pool, clients, n, repeat_share, cache_mb, work) -> dict:
    distinct = noise_images(n, seed=7)  # as many images as requests: a repeat is only what the stream repeats
    stream = _stream(n, len(distinct), repeat_share)
    runs = {}
    for label, cache_bytes in (("uncached", None), ("cached", round(cache_mb * 2**20))):
        repo = work / f"cache_{label}"
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(export, repo)
        with TritonServer(repo, free_endpoints(), cache_bytes=cache_bytes) as server:
            runs[label] = _stream_run(server, distinct, stream, clients)
            runs[label]["rss_mb"] = tree_rss(server.pid) / 2**20
    # equal up to the batch's effect on the runtime's sums (the dynamic batcher groups requests differently)
    same = np.allclose(runs["uncached"]["logits"], runs["cached"]["logits"], rtol=0, atol=1e-5)
    for run in runs.values():
        run.pop("logits")
    limit = _cache_limit(export, work)
    return {
        "requests": n,
        "repeat_share_asked": repeat_share,
        "repeats": n - len(set(stream)),
        "clients": clients,
        "cache_mb": cache_mb,
        "answers_equal_cached_vs_uncached": bool(same),
        "throughput_ratio_cached_over_uncached": runs["cached"]["images_per_s"] / runs["uncached"]["images_per_s"],
        **runs,
        "at_limit": limit,
    }


def _stream_run(server: TritonServer, images, stream: list[int], clients: int) -> dict:
    url = server.endpoints.grpc_url
    logits: list[float | None] = [None] * len(stream)
    latencies: list[float] = [0.0] * len(stream)
    next_index = iter(range(len(stream)))
    lock = threading.Lock()

    def work() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t = time.monotonic()
                r = client.infer(IMAGE_ENTRANCE, [_input(images[stream[i]][1])])
                latencies[i] = time.monotonic() - t
                logits[i] = float(r.as_numpy(LOGIT).item())

    start = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    metrics = _metrics(server)
    return {
        "seconds": seconds,
        "images_per_s": len(stream) / seconds,
        **_percentiles(latencies),
        "cache_hits": metrics.get(f'nv_cache_num_hits_per_model{{model="{IMAGE_ENTRANCE}",version="1"}}', 0.0),
        "cache_misses": metrics.get(f'nv_cache_num_misses_per_model{{model="{IMAGE_ENTRANCE}",version="1"}}', 0.0),
        "logits": logits,
    }


def _metrics(server: TritonServer) -> dict[str, float]:
    text = urllib.request.urlopen(server.endpoints.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _cache_limit(export: Path, work: Path, cache_kb: int = 64, requests: int = 40) -> dict:
    """A `cache_kb` KiB cache filled with evidence answers until it evicts: what it holds at its limit."""
    repo = work / "cache_limit"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(export, repo)
    images = noise_images(requests, seed=11)
    with TritonServer(repo, free_endpoints(), cache_bytes=cache_kb * 1024) as server:
        before = tree_rss(server.pid)
        with grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client:
            for _, data in tqdm(images, desc="filling the cache"):
                client.infer(EVIDENCE_ENTRANCE, [_input(data)])
        metrics = _metrics(server)
        after = tree_rss(server.pid)
    return {
        "cache_kb": cache_kb,
        "distinct_requests": requests,
        "entries": metrics.get("nv_cache_num_entries"),
        "evictions": metrics.get("nv_cache_num_evictions"),
        "utilisation": metrics.get("nv_cache_util"),
        "bytes_held": (metrics.get("nv_cache_util") or 0) * cache_kb * 1024,
        "server_rss_mb_before": before / 2**20,
        "server_rss_mb_after": after / 2**20,
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    r = report["rollout"]
    ids = sorted({m for _, _, m in r["timeline"] if m})
    for m in ids:
        pts = [(t, lat * 1e3) for t, lat, mid in r["timeline"] if mid == m and lat is not None]
        a.scatter(*zip(*pts, strict=True), s=6, label=f"answered by {m}")
    t0 = 0.0
    for phase, p in r["phases"].items():
        t0 += p["seconds"]
        a.axvline(t0, color="grey", lw=0.6)
        a.text(t0, a.get_ylim()[1] if a.has_data() else 0, phase, rotation=90, fontsize=7, va="top", ha="right")
    a.set_xlabel("request sent at (s)")
    a.set_ylabel("latency (ms)")
    a.set_title(f"sent {r['sent']}, answered {r['answered']}, failed {r['failed']}, lost {r['lost']}", fontsize=9)
    a.legend(fontsize=7)
    c = report["cache"]
    labels = ["uncached", "cached"]
    b.bar(labels, [c[k]["images_per_s"] for k in labels], color=["#888", "#2a7"])
    for i, k in enumerate(labels):
        label = f"p50 {c[k]['p50_ms']:.0f} ms\np99 {c[k]['p99_ms']:.0f} ms"
        b.text(i, c[k]["images_per_s"], label, ha="center", va="bottom", fontsize=8)
    b.set_ylim(0, 1.25 * max(c[k]["images_per_s"] for k in labels))
    b.set_ylabel("images/s")
    b.set_title(f"{c['requests']} requests, {c['repeats']} repeats ({c['clients']} clients)", fontsize=9)
    save_figure(fig, path, report["title"])
