"""Options more than one command takes, and their mapping onto the library's typed options."""

from __future__ import annotations

import argparse

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
