"""Options more than one command takes, and their mapping onto the library's typed options.

The runtime options (`add_runtime_arguments`, `open_scorer`: `d3qe score` and `d3qe eval`) import
`serving.inprocess` only when an in-process runtime is asked for, so that `d3qe score --url …` loads no
model code.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from d3qe_serve.client.grpc_client import DEFAULT_MODEL, DEFAULT_URL, D3QEClient
from d3qe_serve.client.results import DEFAULT_THRESHOLD, Scorer
from d3qe_serve.serving.inprocess import WeightOptions


def add_weight_arguments(p: argparse.ArgumentParser, role: str = "") -> None:
    """--checkpoint, --vq-checkpoint, --preset, --seed, --freq-bias; `role` prefixes their help ("eager: ")."""
    p.add_argument(
        "--checkpoint",
        help=f"{role}the authors' D³QE .pth, or our .safetensors inference weights "
        "(default: seeded random weights, whose scores mean nothing)",
    )
    p.add_argument("--vq-checkpoint", help=f"{role}LlamaGen's vq_ds16_c2i.pt (replaces the checkpoint's tokenizer)")
    # Checked by load_detector (d3qe.PRESETS, d3qe.config.FREQ_BIAS_MODES): argparse choices would import torch.
    p.add_argument("--preset", default="full", help=f"{role}architecture of seeded weights: full or tiny")
    p.add_argument("--seed", type=int, default=0, help=f"{role}seed of the random weights without a checkpoint")
    p.add_argument(
        "--freq-bias",
        default="reference",
        help=f"{role}reference: upstream's published behaviour (zero frequency bias); stats: the saved counts",
    )


def weight_options(args: argparse.Namespace) -> WeightOptions:
    """The weights `add_weight_arguments`' options name."""
    return WeightOptions(args.checkpoint, args.vq_checkpoint, args.preset, args.seed, args.freq_bias)


# The runtimes other than the server, as `--runtime NAME` offers them.
IN_PROCESS = {
    "eager": "the eager PyTorch model in this process (needs the [model] extra)",
    "exported": "an exported repository's parts chained in this process (--repo; needs the [serve] extra)",
}


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model runs: options shared by `d3qe score` and `d3qe eval`."""
    p.add_argument(
        "--runtime",
        choices=["server", *IN_PROCESS],
        default="server",
        help="the Triton server over gRPC (default)" + "".join(f"; {n}: {h}" for n, h in IN_PROCESS.items()),
    )
    p.add_argument("--url", default=DEFAULT_URL, help="server: gRPC address host:port")
    p.add_argument("--model", default=DEFAULT_MODEL, help="server: the ensemble taking encoded images")
    p.add_argument("--concurrency", type=int, default=4, help="server: requests in flight")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="server: seconds to wait per request (the server still finishes it)",
    )
    p.add_argument("--ready-timeout", type=float, default=30.0, help="server: seconds to wait for it to be ready")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="server: send images through system shared memory (client and server on one host)",
    )
    add_weight_arguments(p, role="eager: ")
    p.add_argument("--repo", type=Path, help="exported: the repository `d3qe export` wrote (default: its --out)")
    p.add_argument("--device", default="cpu", help="exported: cpu, or cuda[:N] (ONNX Runtime CUDA provider, TensorRT)")
    p.add_argument("--threads", type=int, help="exported: intra-op threads (default: the runtime's own)")
    p.add_argument(
        "--threshold",
        type=float,
        help="P(generated) above which the verdict is generated (default: the server's, which each answer carries; "
        f"exported: the export's operating point; eager: {DEFAULT_THRESHOLD})",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass or per request")


def local_threshold(args: argparse.Namespace) -> float:
    """The verdict's threshold where no server says one: --threshold, else upstream's."""
    return DEFAULT_THRESHOLD if args.threshold is None else args.threshold


@contextlib.contextmanager
def open_scorer(args: argparse.Namespace, model: str | None = None) -> Iterator[Scorer]:
    """The runtime `args` ask for, ready to score; the server's readiness and interface are checked first.
    `model`: the server's entrance, if not `args.model`."""
    if args.runtime == "eager":
        from d3qe_serve.serving.inprocess import open_eager

        yield open_eager(weight_options(args), threshold=local_threshold(args), batch_size=args.batch_size)
        return
    if args.runtime == "exported":
        from d3qe_serve.serving.inprocess import open_exported
        from d3qe_serve.serving.operating_point import OperatingPoint
        from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

        repo = args.repo or DEFAULT_REPOSITORY
        yield open_exported(
            repo,
            device=args.device,
            threads=args.threads,
            # the export's operating point (`d3qe calibrate --write`), as a server of it would use
            threshold=OperatingPoint.read(repo).threshold if args.threshold is None else args.threshold,
            batch_size=args.batch_size,
        )
        return
    with D3QEClient(
        args.url,
        model or args.model,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        timeout=args.timeout,
        threshold=args.threshold,
        shared_memory=args.shared_memory,
    ) as client:
        client.wait_until_ready(timeout=args.ready_timeout)
        yield client.score
