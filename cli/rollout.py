"""`d3qe rollout`: another export live on a running server while clients keep scoring, or a rollback; prints
what is live. The library is `serving.rollout`; the server runs with `d3qe serve --model-control-key-file`."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.client.grpc_client import DEFAULT_URL
from d3qe_serve.serving.rollout import DRAIN_TIMEOUT_S, LiveRecord, describe, read_key, rollback, rollout
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", nargs="?", type=Path, help="the export to put live (written by `d3qe export --out`)")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="the repository the server serves")
    p.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address host:port")
    p.add_argument("--key-file", type=Path, help="the model-control key (`d3qe serve --model-control-key-file`)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--rollback", action="store_true", help="put the generation live before this one back")
    action.add_argument("--to", type=int, metavar="N", help="put generation N back (a rollback to it)")
    action.add_argument("--status", action="store_true", help="print what is live, change nothing")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        help="seconds to wait for the old version's requests before unloading it (past it, it stays loaded)",
    )


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.errors import InputError

    repo = args.model_repository
    if args.status:
        print(describe(LiveRecord.of(repo)))
        return 0
    if args.key_file is None:
        raise InputError("--key-file: a rollout needs the model-control key the server was started with")
    options = {"url": args.url, "key": read_key(args.key_file), "drain_timeout": args.drain_timeout}
    if args.rollback or args.to is not None:
        record = rollback(repo, to=args.to, **options)
    elif args.export is None:
        raise InputError("give the export to put live, or --rollback, --to N or --status")
    else:
        record = rollout(repo, args.export, **options)
    print(describe(record))
    return 0
