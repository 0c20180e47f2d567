"""`d3qe fidelity`: what each runtime and precision does to the paper's scores, on the fidelity corpus.

Every image of the corpus (`export.corpus`: photographs, their crops, rescales, rotations, JPEG
re-encodes, mode conversions, synthetic scenes) goes through the eager fp32 model, the reference, and
through each configuration: exported repositories in-process (`--repo`, any runtime and precision
their manifests say), the eager model's parts cast to another precision (`--torch fp16 bf16`; on a
GPU `tf32` too), and a served repository over gRPC (`--server`). Per configuration:

- code indices: % of tokens equal, % of images with every token equal;
- near-ties: % of tokens whose two best codes (reference) score closer than twice the configuration's
  error on that token's latent, i.e. where a flip is possible (`export.validate.token_ties`), and how
  many tokens flipped outside them (0 for any correct runtime);
- |Δlogit| p50 / p99 / max, over all images and over the images with a flipped token;
- verdict agreement at the 0.5 threshold.

A served configuration returns logits only: its index columns are empty. Parts whose artifact is the
same file (an int8 export keeps the fp32 VQ encoder) are run once. Writes `fidelity.json`, `fidelity.md` and
`fidelity.png` under `benchmarks/results/<machine>-<date>/` (under the working directory).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.benchmarks import Results, exported_weights, report_header, results_dir, save_figure, weights_record
from d3qe_serve.contract import INDICES, LOGIT, PIXELS, RESIDUAL
from d3qe_serve.errors import InputError
from d3qe_serve.export.fidelity import summarize
from d3qe_serve.serving.inprocess import WeightOptions

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# The eager parts' precisions and the torch dtype each runs in (tf32: fp32 with TF32 matmuls, CUDA only).
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "tf32": "float32"}


@dataclass
class Config:
    """One way of running the model: per part a runner and a key (equal keys: the same computation, run once)."""

    name: str
    runtime: str
    precision: str
    runners: dict[str, tuple[str, Runner]] = field(default_factory=dict)
    url: str | None = None  # served: scored over gRPC instead
    limit: int | None = None  # only an evenly spread subset of this many images (slow configurations)

    def subset(self, n: int) -> np.ndarray:
        """Indices of the images this configuration runs, of the `n` measured."""
        if not self.limit or self.limit >= n:
            return np.arange(n)
        return np.unique(np.linspace(0, n - 1, self.limit).round().astype(int))


def _module_runner(spec, module, tf32: bool) -> Runner:
    """A `d3qe.parts` module as a runner: numpy feeds by input name → numpy outputs by output name.

    On CUDA, fp32 is held to fp32 (torch lets cuDNN convolutions use TF32 by default) unless `tf32`.
    """
    import torch

    from d3qe_serve.serving.runtimes import cuda_fp32

    device = next(module.parameters()).device

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), cuda_fp32(tf32):
            outs = module(*(torch.from_numpy(feeds[n]).to(device) for n in spec.input_names))
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {n: t.cpu().numpy() for n, t in zip(spec.output_names, outs, strict=True)}

    return run


def eager_config(model, precision: str, device: str) -> Config:
    """The eager model's parts at `precision` (fp32, fp16, bf16; tf32: fp32 with TF32 matmuls, CUDA only)."""
    import copy

    import torch

    from d3qe_serve.d3qe.parts import part_specs

    dtype = getattr(torch, PRECISIONS[precision])
    if device != "cpu":  # a copy: the reference stays on the CPU
        model = copy.deepcopy(model).to(device)
    tf32 = precision == "tf32"
    runners = {
        name: (f"torch-{precision}-{device}-{name}", _module_runner(spec, spec.module(model, dtype), tf32))
        for name, spec in part_specs(model.cfg).items()
    }
    runtime = "pytorch eager" if precision == "fp32" else "torch"
    return Config(f"torch {precision}" + ("" if device == "cpu" else f" ({device})"), runtime, precision, runners)


def repo_config(repo: Path, device: str) -> Config:
    from d3qe_serve.serving.manifest import Manifest
    from d3qe_serve.serving.runtimes import load_part

    manifest = Manifest.read(repo)
    runtime, precision = manifest.describe()
    runners = {part: (entry.sha256, load_part(repo, part, device)) for part, entry in manifest.parts.items()}
    return Config(f"{repo.name}: {runtime} {precision}", runtime, precision, runners)


def run_parts(config: Config, pixels: list[np.ndarray], batch: int, cache: dict) -> dict[str, np.ndarray]:
    """Every image through the configuration's three parts in turn; outputs already computed under the same
    keys (same artifact, same upstream) are reused."""
    from d3qe_serve.d3qe.parts import PART_NAMES

    tensors = {PIXELS: np.stack(pixels)}
    upstream = f"{len(pixels)} images"
    for part in PART_NAMES:
        key, runner = config.runners[part]
        upstream = f"{upstream}/{key}"
        if upstream not in cache:
            chunks = []
            for start in tqdm(range(0, len(pixels), batch), desc=f"{config.name}: {part}", unit="batch", leave=False):
                # every tensor so far: a runner takes the inputs its part declares
                chunks.append(runner({n: t[start : start + batch] for n, t in tensors.items()}))
            cache[upstream] = {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}
        tensors.update(cache[upstream])
    return tensors


def served_logits(url: str, items, timeout: float) -> np.ndarray:
    """The corpus' encoded bytes through the server's `d3qe` ensemble (its own decoding): logits, NaN if failed."""
    from d3qe_serve.client.grpc_client import D3QEClient

    logits = np.full(len(items), np.nan)
    with D3QEClient(url, timeout=timeout) as client:
        client.wait_until_ready(timeout=60)
        results = client.score((item.name, item.data) for item in items)  # in input order, failures in their slot
        for i, r in enumerate(tqdm(results, total=len(items), desc=f"served {url}", unit="img")):
            if r.ok:
                logits[i] = r.logit
    return logits


def reference_gaps(reference: dict[str, np.ndarray], codebook: np.ndarray) -> dict[str, float]:
    """How tied the reference's own code choices are: share of tokens whose two best codes score within d."""
    from d3qe_serve.export.validate import token_ties

    residual, indices = reference[RESIDUAL], reference[INDICES]
    gap = token_ties(residual, indices, residual, indices, codebook)["gap"]
    return {f"gap<{d:g}": float((gap < d).mean()) for d in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)}


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.6 * len(rows) + 2.5), width_ratios=(3, 2))
    names = [r["config"] for r in rows]
    floor = 1e-9  # log axis: identical logits drawn at the floor
    left.boxplot([np.maximum(r["per_image_dlogit"], floor) for r in rows], vert=False, tick_labels=names, whis=(0, 100))
    left.set_xscale("log")
    left.set_xlabel("|Δlogit| vs eager fp32, per image (whiskers: min–max)")
    y = np.arange(len(rows))
    agreement = [100 * r.get("token_agreement", np.nan) for r in rows]
    ties = [100 * r.get("near_tie_rate", np.nan) for r in rows]
    right.barh(y - 0.2, [100 - a for a in agreement], 0.4, label="tokens flipped (%)")
    right.barh(y + 0.2, ties, 0.4, label="near-tie tokens (%)")
    right.set_yticks(y, [""] * len(rows))
    right.set_xlabel("% of tokens (served: logits only)")
    right.legend(loc="lower right", fontsize=8)
    left.invert_yaxis()
    right.invert_yaxis()
    save_figure(fig, path, title)


def measure(
    model,
    configs: list[Config],
    items,
    batch: int,
    timeout: float = 600.0,
    progress: Callable[[dict], None] = lambda report: None,
) -> dict:
    """Reference and every configuration over `items` (corpus items); the report's rows and reference gaps.

    `progress` gets the report so far after each configuration (a long run keeps what it measured).
    """
    from d3qe_serve.d3qe import preprocess

    pixels = [preprocess(item.data).numpy() for item in tqdm(items, desc="decoding the corpus", unit="img")]
    cache: dict = {}
    reference_config = eager_config(model, "fp32", "cpu")
    start = time.perf_counter()
    reference = run_parts(reference_config, pixels, batch, cache)
    seconds = {reference_config.name: time.perf_counter() - start}
    codebook = model.vq_model.quantize.embedding.weight.detach().cpu().numpy()
    report = {
        "reference_seconds": round(seconds[reference_config.name], 1),
        "reference_gaps": reference_gaps(reference, codebook),
        "reference_logits": reference[LOGIT].reshape(-1).tolist(),
        "rows": [],
    }
    for config in configs:
        start = time.perf_counter()
        subset = config.subset(len(items))
        ref = {n: a[subset] for n, a in reference.items()}
        if config.url:
            got = {LOGIT: served_logits(config.url, [items[i] for i in subset], timeout)}
            row = summarize(config.name, {LOGIT: ref[LOGIT]}, got, None)
        else:
            row = summarize(config.name, ref, run_parts(config, [pixels[i] for i in subset], batch, cache), codebook)
        row["image_indices"] = subset.tolist()
        row["seconds"] = round(time.perf_counter() - start, 1)
        report["rows"].append(row)
        print(_line(row), file=sys.stderr, flush=True)
        progress(report)
    return report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3f}"


def _line(r: dict) -> str:
    d = r["dlogit"]
    fmt = "{:.2e}".format
    tokens = (
        f"tokens equal {_pct(r.get('token_agreement'))} %, images all equal {_pct(r.get('images_all_tokens_equal'))} %"
        f", near-ties {_pct(r.get('near_tie_rate'))} %, flips outside ties {r.get('flips_outside_ties', '-')}; "
        if "token_agreement" in r
        else ""
    )
    return (
        f"{r['config']}: {r['images']} images, {tokens}|Δlogit| p50 {fmt(d['p50'])} p99 {fmt(d['p99'])} "
        f"max {fmt(d['max'])}, verdicts agree {_pct(r['verdict_agreement'])} %"
    )


def markdown(report: dict) -> str:
    lines = [
        "| configuration | images | tokens equal % | images all equal % | near-tie tokens % | flips outside ties "
        "| Δlogit p50 | p99 | max | max on images with a flip | verdicts agree % |",
        "|---" * 11 + "|",
    ]
    for r in report["rows"]:
        d, f = r["dlogit"], r.get("dlogit_images_with_flips", {})
        cell = "{:.1e}".format
        lines.append(
            f"| {r['config']} | {r['images']} | {_pct(r.get('token_agreement'))} "
            f"| {_pct(r.get('images_all_tokens_equal'))} | {_pct(r.get('near_tie_rate'))} "
            f"| {r.get('flips_outside_ties', '-')} | {cell(d['p50'])} | {cell(d['p99'])} | {cell(d['max'])} "
            f"| {cell(f['max']) if f.get('max') is not None else '-'} | {_pct(r['verdict_agreement'])} |"
        )
    return "\n".join(lines)


def fidelity(
    *,
    weights: WeightOptions,
    repos: Sequence[Path] = (),
    precisions: Sequence[tuple[str, int | None]] = (),
    server: bool = False,
    url: str | None = None,
    server_limit: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    timeout: float = 600.0,
    out: Path | None = None,
) -> Results:
    """The corpus (`limit`: an evenly spread subset of that many images) through the eager fp32 reference (the
    weights `repos[0]` was exported from) and each configuration: every repository in-process on `device`, the
    eager parts in each of `precisions` (precision, subset size or None: every image), and with `server` the first
    repository served (or the server at `url`; `server_limit`: a subset). Writes fidelity.json, fidelity.md and
    fidelity.png to `out` (default `results_dir`) after each configuration."""
    import json

    from d3qe_serve.export.corpus import corpus, corpus_digest
    from d3qe_serve.serving.host import machine

    for precision, _ in precisions:
        if precision not in PRECISIONS:
            raise InputError(f"--torch {precision}: the precisions are fp32, fp16, bf16 and tf32")
        if precision == "tf32" and not device.startswith("cuda"):
            raise InputError(f"--torch tf32 is a CUDA setting: not on {device}")
    if (server or url) and not (url or repos):
        raise InputError("--server serves the first --repo: name one")
    items = corpus(limit)
    reference = exported_weights(weights, repos[0] if repos else None)
    model = reference.load()
    configs = [repo_config(repo, device) for repo in repos]
    for precision, subset in precisions:
        configs.append(eager_config(model, precision, device))
        configs[-1].limit = subset
    info = machine(device)
    out_dir = results_dir(info, out)
    kinds: dict[str, int] = {}
    for item in items:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    header = {
        **report_header(f"d3qe fidelity on {len(items)} corpus images", info),
        "model": weights_record(reference),
        "corpus": {"images": len(items), "kinds": kinds, "sha256": corpus_digest(items)},
        "images": [item.name for item in items],
    }

    def write(report: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fidelity.json").write_text(json.dumps({**header, **report}, indent=1) + "\n")
        (out_dir / "fidelity.md").write_text(f"## {header['title']}\n\n{markdown(report)}\n")
        plot(out_dir / "fidelity.png", report["rows"], header["title"])

    if server or url:
        from d3qe_serve.serving.server import served

        with served(url, repos[0] if repos else None) as (served_url, _):
            name = f"served {url or repos[0].name} (gRPC, d3qe ensemble)"
            # before the torch configurations: the slowest on a CPU come last (each row is written when done)
            configs.insert(len(repos), Config(name, "triton", "-", url=served_url, limit=server_limit))
            report = measure(model, configs, items, batch_size, timeout, write)
    else:
        report = measure(model, configs, items, batch_size, progress=write)
    return Results.written({**header, **report}, out_dir, "fidelity.json", "fidelity.md", "fidelity.png")
