"""`d3qe export`: the options of an export, mapped onto `export.driver.export_model`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3qe_serve.cli.options import add_weight_arguments, weight_options
from d3qe_serve.errors import CheckpointError, ImageError, MissingDependencyError, UnsupportedError, ValidationError
from d3qe_serve.export.driver import export_model
from d3qe_serve.export.plan import EXPORT_PRECISIONS, RUNTIMES
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weight_arguments(p)
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    p.add_argument(
        "--precision",
        choices=EXPORT_PRECISIONS,
        default="fp32",
        help="int8: ONNX Runtime's dynamic int8 on onnxruntime, static int8 calibrated on corpus images on openvino; "
        "only where a part declares it (d3qe/parts.py)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the artifacts take")
    p.add_argument("--out", type=Path, default=DEFAULT_REPOSITORY, help="the Triton repository to write")
    p.add_argument(
        "--images", nargs="*", type=Path, default=[], help="up to 8 images to validate on, besides seeded pixels"
    )
    p.add_argument("--device", default="cpu", help="where validation runs: cpu, cuda, cuda:N")
    p.add_argument(
        "--trt-plugin",
        action="store_true",
        help="TensorRT: D³AT attention through the fused-kernel plugin (export/tensorrt_plugin.py)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch runtime: the served parts run through torch.compile (Inductor; CUDA graphs on a GPU), "
        "each batch padded to a power of two",
    )
    p.add_argument(
        "--native-configs",
        action="store_true",
        help="also write <part>/configs/native.pbtxt for NVIDIA's server container's onnxruntime_onnx / "
        "tensorrt_plan backends (unverified here)",
    )


def run(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        manifest = export_model(
            weight_options(args),
            args.out,
            runtime=args.runtime,
            precision=args.precision,
            max_batch=args.max_batch,
            images=args.images,
            plugin=args.trt_plugin,
            device=args.device,
            native_configs=args.native_configs,
            compile=args.compile,
            log=log,
        )
    except ValidationError as e:
        log(f"d3qe export: VALIDATION FAILED\n{e}")
        return 1
    except (UnsupportedError, MissingDependencyError, CheckpointError, ImageError, FileNotFoundError, ValueError) as e:
        log(f"d3qe export: {e}")
        return 2
    log(f"wrote {args.out / 'manifest.json'}: {len(manifest.parts)} parts, validated")
    return 0
