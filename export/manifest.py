"""`manifest.json` beside the artifacts: what was exported, from what, with what, and how it validated."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from d3qe import D3QE
from d3qe.config import D3QEConfig

MANIFEST = "manifest.json"
FORMAT = "d3qe-export/1"
_TOOLS = ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "open_clip_torch", "numpy", "tensorrt")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict:
    """The host, in the words the benchmark notes use: CPU model, cores, the SIMD extensions that matter."""
    cpu, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": sorted(flags.intersection(_CPU_FLAGS)),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def checkpoint_record(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def new_manifest(
    model: D3QE,
    *,
    checkpoint: str | Path | None,
    vq_checkpoint: str | Path | None,
    preset: str,
    seed: int,
    runtime: str,
    precision: str,
    max_batch: int,
) -> dict:
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "tools": tool_versions(),
        "checkpoint": checkpoint_record(checkpoint),
        "vq_checkpoint": checkpoint_record(vq_checkpoint),
        "freq_bias": model.freq_bias,
        "config": model.cfg.to_json(),
        "runtime": runtime,
        "precision": precision,
        "max_batch": max_batch,
        "parts": {},
    }
    if checkpoint is None:
        manifest["seeded_weights"] = {"preset": preset, "seed": seed}  # scores mean nothing
    return manifest


def config_of(manifest: dict) -> D3QEConfig:
    return D3QEConfig.from_json(manifest["config"])


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(repo_dir: Path) -> dict:
    path = Path(repo_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {repo_dir}: export the model there first (`d3qe export --out DIR`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
