"""D³ASA attention, softmax(q·kᵀ/√d + γ·qb·kbᵀ)·v, three ways, at D³AT's shape (8 heads of 64, L = 256):

- `released`: the released code's eager form (`freq_biased_attention_math`, two [B, 8, L, L] matrices);
- `sdpa_concat`: PyTorch SDPA on the concatenated form [q/√d, γ·qb]·[k, kb]ᵀ (concatenation included);
- `fused`: the op as D³AT calls it, which on CUDA runs the fused Triton kernel (CUDA only).

Time per call (median of torch.utils.benchmark's blocked_autorange), achieved TFLOP/s counting the three
L×L matmuls (2·B·H·L²·(D + Db + Dv) FLOP, the same count for every method), the speed-up over
`released` measured in the same run, and each method's max |error| against float64 math. Writes JSON
and a plot to benchmarks/results/attention-<device>-<dtypes>.{json,png} (under the working directory).

    d3qe bench-attention                    # CUDA if present (fp16, bf16), else CPU (fp32)
    d3qe bench-attention --device cpu --dtypes fp32
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from tqdm import tqdm

from d3qe_serve.benchmarks import RESULTS, Results, save_figure
from d3qe_serve.d3qe.attention import freq_biased_attention, freq_biased_attention_math
from d3qe_serve.errors import InputError
from d3qe_serve.serving.host import machine, tool_versions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sdpa_concat(q, k, v, qb, kb, gamma):
    scale = q.shape[-1] ** -0.5
    queries = torch.cat([q * scale, gamma.to(q.dtype) * qb], dim=-1)
    return F.scaled_dot_product_attention(queries, torch.cat([k, kb], dim=-1), v, scale=1.0)


def methods(device: str) -> dict[str, Callable]:
    table = {"released": freq_biased_attention_math, "sdpa_concat": sdpa_concat}
    if device == "cuda":
        table["fused"] = freq_biased_attention
    return table


def attention_flop(batch: int, heads: int, length: int, dim: int) -> int:
    return 2 * batch * heads * length * length * (dim + dim + dim)  # q·kᵀ, qb·kbᵀ, P·v


def inputs(batch: int, heads: int, length: int, dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(batch)
    tensors = [torch.randn(batch, heads, length, dim, generator=gen).to(device, dtype) for _ in range(5)]
    return (*tensors, torch.tensor([0.3], device=device))  # γ an fp32 parameter, as under autocast


def measure(device: str, dtypes: list[str], batches: list[int], heads: int, length: int, dim: int, min_run_time: float):
    rows = []
    runs = [(d, b, name, fn) for d in dtypes for b in batches for name, fn in methods(device).items()]
    for dtype_name, batch, name, fn in tqdm(runs, desc=f"attention on {device}", unit="case"):
        args = inputs(batch, heads, length, dim, DTYPES[dtype_name], device)
        with torch.inference_mode():
            error = (fn(*args).double() - freq_biased_attention_math(*(a.double() for a in args))).abs().max()
            timer = Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
            timing = timer.blocked_autorange(min_run_time=min_run_time)
        seconds = timing.median
        rows.append(
            {
                "dtype": dtype_name,
                "batch": batch,
                "method": name,
                "ms_per_call": seconds * 1e3,
                "iqr_ms": timing.iqr * 1e3,
                "runs": len(timing.times),
                "tflop_per_s": attention_flop(batch, heads, length, dim) / seconds / 1e12,
                "max_abs_error_vs_float64": error.item(),
            }
        )
    for row in rows:
        released = next(
            r for r in rows if (r["dtype"], r["batch"], r["method"]) == (row["dtype"], row["batch"], "released")
        )
        row["speedup_vs_released"] = released["ms_per_call"] / row["ms_per_call"]
    return rows


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    width = 0.8 / len(names)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for i, name in enumerate(names):
            picked = {r["batch"]: r for r in rows if (r["dtype"], r["method"]) == (dtype, name)}
            xs = [j + i * width for j in range(len(batches))]
            bars = ax.bar(xs, [picked[b]["ms_per_call"] for b in batches], width, label=name)
            ax.bar_label(bars, [f"{picked[b]['speedup_vs_released']:.2f}×" for b in batches], fontsize=7)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (log)")
        ax.set_title(f"{dtype} (labels: speed-up over released)")
        ax.legend(fontsize=8)
    save_figure(fig, path, title, fontsize=9, dpi=120)


def bench_attention(
    *,
    device: str | None = None,
    dtypes: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8, 64),
    length: int = 256,
    heads: int = 8,
    head_dim: int = 64,
    min_run_time: float = 2.0,
    out: Path = RESULTS,
) -> Results:
    """Every method at each batch size and dtype on `device` (default: CUDA if present, else the CPU; dtypes
    default fp16 and bf16 on CUDA, fp32 on the CPU), `min_run_time` seconds of timed calls each; writes
    attention-<device>-<dtypes>.json and .png to `out`."""
    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise InputError("--device cuda: no CUDA device here")
    dtypes = list(dtypes or (["fp16", "bf16"] if device == "cuda" else ["fp32"]))

    load_before = os.getloadavg()[0]  # other work on the machine skews the numbers: record it
    rows = measure(device, dtypes, list(batches), heads, length, head_dim, min_run_time)
    info = machine(device) | {
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "torch_threads": torch.get_num_threads(),
    }
    report = {
        "benchmark": "d3qe::freq_biased_attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": tool_versions(commit=True),
        "machine": info,
        "shape": {"heads": heads, "length": length, "head_dim": head_dim, "batches": list(batches)},
        "flop_per_call": "2·B·H·L²·(D + Db + Dv)",
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "not_run": {} if device == "cuda" else {"fused": "the fused Triton kernel runs on CUDA only"},
        "results": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = f"attention-{device}-{'-'.join(dtypes)}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    where = info.get("gpu") or f"{info['cpu']}, {info['torch_threads']} threads"
    title = f"D³ASA attention, H={heads}, L={length}, D={head_dim}: {where}"
    title += "".join(f"\n{name} not run: {why}" for name, why in report["not_run"].items())
    plot(out / f"{stem}.png", rows, title)
    return Results.written(report, out, f"{stem}.json", f"{stem}.png")


def summary_lines(report: dict) -> list[str]:
    """One line per measurement: time per call, TFLOP/s, speed-up over `released` and error."""
    return [
        f"{r['dtype']} B={r['batch']:>3} {r['method']:<12} {r['ms_per_call']:9.3f} ms  "
        f"{r['tflop_per_s']:7.4f} TFLOP/s  ×{r['speedup_vs_released']:.2f} vs released  "
        f"err {r['max_abs_error_vs_float64']:.1e}"
        for r in report["results"]
    ]
