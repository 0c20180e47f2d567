"""The command-line options that choose the detector's weights, shared by every command that builds one."""

from __future__ import annotations

import argparse

from d3qe import D3QE, load_detector
from d3qe.config import FREQ_BIAS_MODES, PRESETS


def add_weight_arguments(p: argparse.ArgumentParser, role: str = "") -> None:
    """--checkpoint, --vq-checkpoint, --preset, --seed, --freq-bias; `role` prefixes their help ("eager: ")."""
    p.add_argument(
        "--checkpoint",
        help=f"{role}the authors' D³QE .pth, or our .safetensors inference weights "
        "(default: seeded random weights, whose scores mean nothing)",
    )
    p.add_argument("--vq-checkpoint", help=f"{role}LlamaGen's vq_ds16_c2i.pt (replaces the checkpoint's tokenizer)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help=f"{role}architecture of seeded weights")
    p.add_argument("--seed", type=int, default=0, help=f"{role}seed of the random weights without a checkpoint")
    p.add_argument(
        "--freq-bias",
        choices=FREQ_BIAS_MODES,
        default="reference",
        help=f"{role}reference: upstream's published behaviour (zero frequency bias); stats: the saved counts",
    )


def detector_from_args(args: argparse.Namespace) -> D3QE:
    return load_detector(
        args.checkpoint, args.vq_checkpoint, preset=args.preset, freq_bias=args.freq_bias, seed=args.seed
    )
