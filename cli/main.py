"""The `d3qe` command: each subcommand a module of `cli/` (its options, mapped onto library calls), imported
only when it is the one asked for.

`d3qe --help` imports none of them, and `d3qe score --url …` imports the client alone (no torch). Errors
raised by the libraries (`d3qe_serve.errors`) become a message and an exit code here, in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from d3qe_serve.errors import (
    D3QEServeError,
    InputError,
    MissingDependencyError,
    ModelMismatchError,
    NotFoundError,
    ServerNotReadyError,
)


@dataclass(frozen=True)
class Command:
    module: str  # under ROOT.cli: holds add_arguments(parser) and run(args) -> exit code
    help: str
    extra: str | None = None  # the pyproject extra that installs what the command imports (None: the client's)


ROOT = "d3qe_serve"  # the one import package; the tiers are its subpackages
MAINTAINERS = "(maintainers) "
COMMANDS = {
    "score": Command("score", "score images and videos: logit, probability, verdict"),
    "eval": Command(
        "eval", "the paper's evaluation (Acc, AP per generator) of a labelled folder, robustness sweeps", "eval"
    ),
    "calibrate": Command(
        "calibrate", "the threshold picked on a labelled folder (target FPR, best accuracy), kept by an export", "eval"
    ),
    "export": Command("export", "export the model to validated ONNX Runtime / TensorRT / torch artifacts", "export"),
    "tune": Command("tune", "each part's runtime and precision chosen by measurement within fidelity bounds", "export"),
    "serve": Command("serve", "run the Triton server on an exported model repository (foreground, loopback)", "serve"),
    "rollout": Command(
        "rollout", "put another export live on a running server, or roll back; print what is live", "serve"
    ),
    "health": Command("health", "probe: the local Triton server ready (or live), every part's process alive"),
    "bulk": Command(
        "bulk", "score a folder, list or table of images on Ray Data into a resumable Parquet dataset", "bulk"
    ),
    "demo": Command("demo", "export, serve, score sample images over gRPC next to the eager model, stop", "export"),
    "ui": Command("ui", "a review page on loopback: drop images and videos, see scores, timelines and evidence", "ui"),
    "bench": Command("bench", "images/s, latency and parity: eager vs exported runtimes vs Triton", "export"),
    "fidelity": Command(
        "fidelity", "what each runtime and precision does to the scores, on the fidelity corpus", "export"
    ),
    "soak": Command("soak", "good and bad requests above capacity for a bounded time: all accounted for", "export"),
    "bench-attention": Command("bench_attention", MAINTAINERS + "D³AT attention: math vs fused kernel", "export"),
    "bench-parts": Command("bench_parts", MAINTAINERS + "each exported part's speed and error against eager", "export"),
    "bench-video": Command("bench_video", MAINTAINERS + "video scoring: frames/s and the timeline", "export"),
    "bench-reward": Command("bench_reward", MAINTAINERS + "the reward client's scores/s against a server", "export"),
    "bench-rollout": Command(
        "bench_rollout", MAINTAINERS + "rollout and rollback under load; the response cache's speed-up", "export"
    ),
    "bench-bulk": Command("bench_bulk", MAINTAINERS + "d3qe bulk on Ray Data: images/s and resumption", "bulk"),
    "bench-heal": Command(
        "bench_heal", MAINTAINERS + "a part's process killed under load: noticed, healed, no request lost", "export"
    ),
    "bench-calibrate": Command(
        "bench_calibrate", MAINTAINERS + "d3qe calibrate's threshold: held-out false-positive rate vs target", "export"
    ),
    "gpu-carry": Command(
        "gpu_carry", MAINTAINERS + "build or unpack what the GPU machine lacks (build/gpu-carry)", "export"
    ),
    "gpu-run": Command("gpu_run", MAINTAINERS + "the staged GPU run: validate and measure into $OUT", "export"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="d3qe", description="D³QE detector: export, serve, score.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every subcommand is listed; only the one named on the command line is imported and given its options.
    chosen = next((a for a in argv if not a.startswith("-")), None)  # `d3qe` has no options but --help
    parsers = {name: sub.add_parser(name, help=c.help, description=c.help) for name, c in COMMANDS.items()}
    if chosen not in COMMANDS:
        parser.parse_args(argv)  # --help, or an error naming the valid commands
        return 2
    command = COMMANDS[chosen]
    try:
        module = importlib.import_module(f"{ROOT}.cli.{command.module}")
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] == ROOT:
            raise
        package = f"d3qe-serve[{command.extra}]" if command.extra else "d3qe-serve"
        print(
            f"d3qe {chosen}: needs {e.name.partition('.')[0]}, which is not installed here: pip install '{package}'",
            file=sys.stderr,
        )
        return 2
    module.add_arguments(parsers[chosen])
    args = parser.parse_args(argv)
    try:
        return module.run(args)
    except D3QEServeError as e:
        print(f"d3qe {chosen}: {e}", file=sys.stderr)
        return exit_code(e)


def exit_code(error: D3QEServeError) -> int:
    """The one mapping of errors to exit codes: 2 for what the caller can fix (input, a missing file or
    dependency, a server named that is not up or not this model's), 1 for a step that failed."""
    fixable = (InputError, NotFoundError, MissingDependencyError, ServerNotReadyError, ModelMismatchError)
    return 2 if isinstance(error, fixable) else 1


if __name__ == "__main__":
    sys.exit(main())
