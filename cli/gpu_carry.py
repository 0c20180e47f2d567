"""`d3qe gpu-carry`: build the GPU machine's carry here (`build`), or install it there offline (`unpack`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.benchmarks.gpu_carry import DEFAULT_CARRY, LIMIT_MIB, PYTHON, build, install_path_hook, unpack


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="download and repack (needs the network)")
    b.add_argument("--out", type=Path, default=DEFAULT_CARRY)
    b.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="most the tree and the carry may take together")
    b.add_argument("--python", default=PYTHON, help="the interpreter it is for (the GPU machine's; a rehearsal's)")
    u = sub.add_parser("unpack", help="install a carry offline")
    u.add_argument("carry", type=Path)
    u.add_argument("dest", type=Path)
    u.add_argument(
        "--path-hook",
        action="store_true",
        help="also make Triton's stubs see PYTHONPATH (a .pth in this interpreter's site-packages)",
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        build(args.out, args.limit_mib, args.python)
    else:
        installed = unpack(args.carry, args.dest)
        if args.path_hook:
            print(f"stubs see PYTHONPATH: {install_path_hook()}")
        print(
            f"installed {len(installed['manifest']['items'])} items: site {installed['site']}, "
            f"numpy<2 {installed['numpy1']}"
        )
    return 0
