"""`d3qe bench-heal` (maintainers): a part's process killed under load on a supervised server; seconds until
readiness is false and until answers come again, requests failed and lost (`benchmarks.heal`). Exit status 1
unless no request failed (after the client's retries), was wrong or lost, and none was answered INTERNAL."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="served on free loopback ports")
    from d3qe_serve.benchmarks.heal import HealLoad

    d = HealLoad()
    p.add_argument("--clients", type=int, default=d.clients, help="clients scoring continuously")
    p.add_argument("--part", default=d.part, help="the python-backend model whose first instance is killed")
    p.add_argument("--before", type=float, default=d.before_s, help="seconds of load before the kill")
    p.add_argument("--after", type=float, default=d.after_s, help="seconds of load after the server is healed")
    p.add_argument("--heal-timeout", type=float, default=d.heal_timeout_s, help="seconds to wait for the heal")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.heal import HealLoad, passed, run_heal, summary_lines

    load = HealLoad(
        clients=args.clients,
        part=args.part,
        before_s=args.before,
        after_s=args.after,
        heal_timeout_s=args.heal_timeout,
    )
    results = run_heal(args.model_repository, load, args.out)
    print("\n".join(summary_lines(results.report)))
    print(f"wrote {results.folder}/heal.json, heal.png")
    return 0 if passed(results.report) else 1
