"""The `d3qe` command."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module holding add_arguments/run, one-line help)
COMMANDS = {
    "score": ("client.score", "score images: path, logit, probability, verdict"),
    "export": ("export.driver", "export the model to validated ONNX Runtime / TensorRT / torch artifacts"),
    "serve": ("client.serve", "run the Triton server on an exported model repository (foreground, loopback)"),
    "demo": ("client.demo", "export, serve, score sample images over gRPC next to the eager model, stop"),
    "eval": ("client.eval", "the paper's evaluation (Acc, AP per generator) of a labelled folder, robustness sweeps"),
    "bench": ("benchmarks.bench", "images/s, latency and parity: eager vs exported runtimes vs Triton over gRPC"),
    "soak": ("benchmarks.soak", "good and bad requests above capacity for a bounded time: every request accounted for"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d3qe", description="D³QE detector: export, serve, score.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
