"""The machine a number was measured on and the tools it ran with: the one home of both.

Manifests and every benchmark's results record these, so that numbers can be compared only where the
machine and the tools are the same.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# The SIMD extensions that decide CPU speed here (AVX-512 and AMX run bf16/int8 matmuls natively).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
TOOLS = (
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "tensorrt",
    "triton",
    "open_clip_torch",
    "numpy",
    "tritonclient",
    "nvidia-pytriton",
    "av",
)


def machine(device: str = "cpu") -> dict:
    """CPU model, cores, the SIMD extensions that matter, memory, load at the time of the call; the GPU on cuda."""
    cpu, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text()
        if name := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            cpu = name.group(1).strip()
        if found := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            flags = set(found.group(1).split())
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # was the machine idle?
    }
    if "torch" in sys.modules:  # only where the caller runs torch: importing it costs seconds
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(info: dict) -> str:
    """A folder name for results from this machine: the GPU's name, else cores and CPU model."""
    if "gpu" in info:
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    cpu = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40].strip("-")
    return f"cpu{info['cores']}c-{cpu}"


def tool_versions(*, commit: bool = False) -> dict[str, str | None]:
    """Python and every installed tool of `TOOLS`; with `commit`, this checkout's git commit (None outside one)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if commit:
        here = Path(__file__).resolve().parent
        try:
            git = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=False
            ).stdout
        except OSError:  # no git on the machine (the GPU machine's image may lack it): no commit to name
            git = ""
        versions["d3qe-serve commit"] = git.strip() or None
    return versions


def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU computes natively (OPTIMIZATION_CAPABILITIES: FP32, BF16, INT8,
    ...); OpenVINO must be installed."""
    import openvino

    return tuple(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_precision_problem(precision: str, capabilities: Iterable[str]) -> str | None:
    """Why OpenVINO cannot compute `precision` ("bf16", "int8-bf16", ...) on a CPU with these capabilities,
    or None where it can. bf16 only where the CPU computes it natively (AVX512-BF16, AMX): elsewhere OpenVINO
    would emulate it, slower than fp32 and no more exact."""
    capabilities = set(capabilities)
    listed = ", ".join(sorted(capabilities))
    if "bf16" in precision and "BF16" not in capabilities:
        return (
            f"this CPU does not compute bfloat16 natively (OpenVINO's CPU capabilities: {listed}; bf16 needs "
            "AVX512-BF16 or AMX): use fp32 or int8"
        )
    if precision.startswith("int8") and "INT8" not in capabilities:
        return f"OpenVINO's CPU plugin reports no INT8 support here (its capabilities: {listed}): use fp32"
    return None
