"""The GPU run's orchestration (benchmarks/gpu_run.py) in its CPU smoke mode, and the carry it installs
(benchmarks/gpu_carry.py) built from PyPI: what can be checked without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from d3qe_serve.benchmarks import gpu_carry
from d3qe_serve.errors import CarryError
from d3qe_serve.serving.install import find_tritonserver, server_environment

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "install",
    "preflight",
    "kernel-tests",
    "kernel-bench",
    "export",
    "parity",
    "throughput-inprocess",
    "throughput-server",
    "throughput-compiled",
]


def gpu_run(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """The wrapper script, as the device command runs it, with this interpreter; returns its results.json."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), *args],
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.server
def test_smoke_run_records_every_stage_and_goes_on_past_a_failure(tmp_path):
    done, results = gpu_run(tmp_path, "--fail", "kernel-tests", timeout=300)
    stages = results["stages"]
    assert list(stages) == STAGES and results["run"]["complete"]
    assert done.returncode == 1  # a stage failed
    status = {name: s["status"] for name, s in stages.items()}
    assert status == dict.fromkeys(STAGES, "ok") | {
        "install": "skipped",
        "kernel-tests": "failed",
        "throughput-compiled": "skipped",
    }
    assert "injected failure" in stages["kernel-tests"]["log_tail"] and stages["kernel-tests"]["rc"] == 1
    assert "CUDA only" in stages["throughput-compiled"]["reason"]

    assert stages["preflight"]["results"]["preflight.json"]["numpy1_imports"]["numpy"].startswith("1.")
    (bench,) = stages["kernel-bench"]["results"].values()
    assert {r["method"] for r in bench["results"]} == {"released", "sdpa_concat"}
    manifest = stages["export"]["results"]["repo/manifest.json"]
    assert set(manifest["parts"]) >= {"vq_encoder", "clip_visual", "d3qe_head"}
    parity = stages["parity"]["results"]["fidelity.json"]
    assert [r["config"] for r in parity["rows"]][-2:] == ["torch fp32", "torch bf16"]
    assert parity["rows"][-2]["dlogit"]["max"] == 0  # the reference's own computation, on the same CPU
    rows = stages["throughput-server"]["results"]["bench.json"]["rows"]
    served = [r["name"] for r in rows if r["runtime"].startswith("triton")]
    assert served == [
        "triton gRPC, 1 clients",
        "triton gRPC, 4 clients",
        "triton gRPC d3qe_rgb, 1 clients",
        "triton gRPC d3qe_rgb, 4 clients",
    ]
    assert all(r["failed"] == 0 and r["verdict_agreement"] == 1 for r in rows)
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)

    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"results.json", "log.txt", "parity.png", "throughput-server.png"} <= set(files)
    log = (out / "log.txt").read_text()
    assert all(f"=== {name}: {status[name]}" in log for name in STAGES)


def test_stages_out_of_time_are_stopped_or_skipped(tmp_path):
    start = time.monotonic()
    _, results = gpu_run(tmp_path, "--budget", "20", timeout=120)
    assert time.monotonic() - start < 20 + 30  # the stage in flight is stopped at the budget (15 s grace)
    status = [s["status"] for s in results["stages"].values()]
    assert status[0] == "skipped"  # no carry here
    first_cut = next(i for i, s in enumerate(status) if i > 0 and s != "ok")  # what ran before it fitted
    assert set(status[first_cut:]) <= {"timeout", "skipped"}
    reasons = [s.get("reason", "") for s in results["stages"].values() if s["status"] == "skipped"]
    assert any(r.startswith("out of time") for r in reasons)


def test_pack_is_reproducible_and_keeps_executables(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tritonserver").write_bytes(b"\x7fELF")
    (src / "lib.so").write_bytes(b"x" * 1000)
    first, second = tmp_path / "a.tar.xz", tmp_path / "b.tar.xz"
    gpu_carry.pack(src, ["lib.so", "bin/tritonserver"], first)
    os.utime(src / "lib.so", (0, 1e9))  # times differ between builds: the tarball must not
    gpu_carry.pack(src, ["bin/tritonserver", "lib.so"], second)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        assert [(m.name, m.mode, m.mtime) for m in tar] == [("bin/tritonserver", 0o755, 0), ("lib.so", 0o644, 0)]


def test_a_carry_file_not_as_built_is_refused_before_installing(tmp_path):
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    wheel = carry / "wheels" / "x-1-py3-none-any.whl"
    wheel.write_bytes(b"as built")
    item = {"file": "wheels/x-1-py3-none-any.whl", "sha256": gpu_carry.sha256(wheel)}
    (carry / "manifest.json").write_text(json.dumps({"items": [item]}))
    wheel.write_bytes(b"changed")
    with pytest.raises(CarryError, match="x-1-py3-none-any.whl does not match its manifest's sha256"):
        gpu_carry.unpack(carry, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.slow
def test_carry_from_pypi_has_what_the_gpu_machine_lacks_and_fits(tmp_path):
    """Downloads about 85 MB (pip's cache keeps it) and xz-compresses the server: about 75 s."""
    carry = tmp_path / "carry"
    manifest = gpu_carry.build(carry)
    assert json.loads((carry / "manifest.json").read_text()) == manifest
    on_disk = sorted(p.relative_to(carry).as_posix() for p in carry.rglob("*") if p.is_file())
    assert on_disk == sorted(["manifest.json", *(i["file"] for i in manifest["items"])])
    assert [i["from"] for i in manifest["items"]] == [*gpu_carry.WHEELS, gpu_carry.NUMPY, gpu_carry.PYTRITON]
    for item in manifest["items"]:
        assert (carry / item["file"]).stat().st_size == item["bytes"]
        assert gpu_carry.sha256(carry / item["file"]) == item["sha256"]
    assert manifest["total_bytes"] == manifest["carry_bytes"] + manifest["tree_bytes"] <= 60 * 2**20

    # The server: the same 0.7.0 wheel is installed in this venv; all its libraries but libpython 3.13.
    installed = Path(find_tritonserver().binary).parents[3]
    libs = sorted(p.name for p in (installed / "nvidia_pytriton.libs").iterdir())
    expected = {f"nvidia_pytriton.libs/{n}" for n in libs if not n.startswith("libpython3")}
    expected |= {
        "pytriton/tritonserver/bin/tritonserver",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
        "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub",
    }
    with tarfile.open(carry / "tritonserver.tar.xz") as tar:
        assert set(tar.getnames()) == expected and len(libs) - 1 == len(expected) - 4
    with tarfile.open(carry / "numpy1.tar.xz") as tar:
        names = tar.getnames()
    assert "numpy/core/_multiarray_umath.cpython-312-x86_64-linux-gnu.so" in names
    assert "numpy-1.26.4.dist-info/METADATA" in names and not [n for n in names if "/tests/" in n]

    # Unpacked offline (pip installs the cp312 wheels whatever runs it), the server starts with its libraries.
    installed = gpu_carry.unpack(carry, tmp_path / "dest")
    site = Path(installed["site"])
    assert {"open_clip", "ftfy", "wcwidth", "tritonclient", "grpc", "google", "ml_dtypes", "rapidjson-stubs"} <= {
        p.name for p in site.iterdir()
    }
    version = (Path(installed["numpy1"]) / "numpy" / "version.py").read_text()
    assert 'version = "1.26.4"' in version
    install = find_tritonserver(site / "pytriton" / "tritonserver" / "bin" / "tritonserver")
    assert install.library_dirs == (site / "nvidia_pytriton.libs",)
    usage = subprocess.run(
        [str(install.binary), "--help"], env=server_environment(install), capture_output=True, text=True, timeout=60
    )
    assert "error while loading shared libraries" not in usage.stderr
    assert "--model-repository" in usage.stdout + usage.stderr
