"""The GPU run's orchestration (benchmarks/gpu_run.py) in its CPU smoke mode, the carry it installs
(benchmarks/gpu_carry.py) built from PyPI, and what of issue 24's findings a CPU can see: the budgets adding up,
a killed stage keeping its rows, per-process GPU memory accounting, the gates' host tensors, the gates'
admission, warm-up at every batch shape, the bf16 export's bounds against full-size measurements."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from d3qe_serve.benchmarks import gpu_carry
from d3qe_serve.benchmarks import gpu_run as driver
from d3qe_serve.benchmarks.bench import (
    admitted,
    concurrency_levels,
    synthetic_images,
    timed_batches,
    warm_every_batch,
)
from d3qe_serve.contract import CLIP_FEAT, IMAGE_ENTRANCE, INDICES, LOGIT, PROB, RESIDUAL, entrances, parts
from d3qe_serve.errors import CarryError
from d3qe_serve.export.validate import TOLERANCES, compare, problems
from d3qe_serve.serving.install import find_tritonserver, server_environment
from d3qe_serve.serving.repository import DEFAULT_ADMITTED_BATCHES, DEFAULT_MAX_QUEUE_SIZE
from d3qe_serve.serving.runtimes import GATE_TENSORS, handed_on

REPO = Path(__file__).resolve().parents[1]
STAGES = ["install", "preflight", "export", "headline", "parity", "kernel-tests", "kernel-bench", "compiled"]
RESULTS = REPO / "benchmarks" / "results"


def gpu_run(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """The wrapper script, as the device command runs it, with this interpreter; returns its results.json."""
    out = tmp_path / "out"
    folders = ["--out", str(out), "--work", str(tmp_path / "work"), "--carry", str(tmp_path / "no-carry")]
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--smoke", *folders, *args],  # no carry: the dev venv has what one holds
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(1800)
def test_smoke_run_records_every_stage_and_goes_on_past_a_failure(tmp_path):
    """Every stage at tiny sizes on this CPU (about 5 minutes on an idle 2-core machine)."""
    done, results = gpu_run(tmp_path, "--fail", "kernel-bench", timeout=1700)
    stages = results["stages"]
    assert list(stages) == STAGES and results["run"]["complete"], done.stdout[-3000:]
    assert done.returncode == 1  # a stage failed
    status = {name: s["status"] for name, s in stages.items()}
    assert status == dict.fromkeys(STAGES, "ok") | {
        "install": "skipped",
        "kernel-bench": "failed",
        "compiled": "skipped",
    }, {n: s.get("log_tail", "")[-1500:] for n, s in stages.items()}
    assert "injected failure" in stages["kernel-bench"]["log_tail"] and stages["kernel-bench"]["rc"] == 1
    assert "CUDA only" in stages["compiled"]["reason"]

    preflight = stages["preflight"]["results"]["preflight.json"]
    assert preflight["passed"] and preflight["one_model_server"]["answered"]
    assert not preflight["libpython"]["not_found"]
    junit = stages["kernel-tests"]["results"]["junit.xml"]
    assert junit["tests"] >= 3 and junit["failures"] == junit["errors"] == 0
    manifest = stages["export"]["results"]["repo/manifest.json"]
    assert set(manifest["parts"]) >= {"vq_encoder", "clip_visual", "d3qe_head"} and manifest["passed"]
    parity = stages["parity"]["results"]["fidelity.json"]
    assert [r["config"] for r in parity["rows"]][-2:] == ["torch fp32", "torch bf16"]
    assert parity["rows"][-2]["dlogit"]["max"] == 0  # the reference's own computation, on the same CPU

    bench = stages["headline"]["results"]["bench.json"]
    rows = bench["rows"]
    assert rows[0]["name"] == "eager (upstream-style), batch 4"  # strict fp32 eager, then served only
    served = [r["name"].split(", ")[-1] for r in rows[1:]]
    # the gates admit as many clients as their queue holds (`bench.admitted`): 100 are measured as 64, said so
    assert served == ["1 clients", "4 clients", "64 clients"] * 2
    assert bench["admission"][IMAGE_ENTRANCE] == {"admitted": 64, "left_out": [100]}
    assert all(r["failed"] == 0 and r["errors"] == [] and r["verdict_agreement"] == 1 for r in rows)
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)

    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"results.json", "log.txt", "parity.png", "headline.png", "headline-triton.log"} <= set(files)
    assert "Started GRPCInferenceService" in (out / "headline-triton.log").read_text()
    log = (out / "log.txt").read_text()
    assert all(f"=== {name}: {status[name]}" in log for name in STAGES)


def test_stages_out_of_time_are_stopped_or_skipped(tmp_path):
    start = time.monotonic()
    _, results = gpu_run(tmp_path, "--budget", "20", timeout=120)
    assert time.monotonic() - start < 20 + 30  # the stage in flight is stopped at the budget (5 s grace)
    status = [s["status"] for s in results["stages"].values()]
    assert status[0] == "skipped"  # no carry here
    first_cut = next(i for i, s in enumerate(status) if i > 0 and s != "ok")  # what ran before it fitted
    assert set(status[first_cut:]) <= {"timeout", "skipped"}
    reasons = [s.get("reason", "") for s in results["stages"].values() if s["status"] == "skipped"]
    assert any(r.startswith("out of time") for r in reasons)


def test_the_budgets_add_up_to_one_command_and_a_rerun():
    """The CUDA plan's stage limits fill the run's budget exactly; with the driver's margin and the grace of the
    last stop it fits the device call's timeout_s (at most 420 s), and two such calls plus a machine's start fit
    the 15 minutes of GPU time; docs/benchmarks.md states that very call."""
    ctx = driver.Context(Path("/tmp/out"), Path("/tmp/work"), Path("/tmp/carry"))
    plan = driver.stages(ctx, smoke=False)
    assert [s.name for s in plan] == STAGES
    assert sum(s.limit_s for s in plan) == driver.RUN_BUDGET_S
    assert driver.RUN_BUDGET_S + driver.STOP_GRACE_S + driver.DRIVER_MARGIN_S <= driver.COMMAND_TIMEOUT_S <= 420
    assert 2 * driver.COMMAND_TIMEOUT_S + driver.MACHINE_START_S <= driver.DEVICE_TIME_S == 15 * 60
    # in order of value: what the headline needs, the headline, then the rest
    assert STAGES.index("headline") < STAGES.index("parity") < STAGES.index("kernel-tests") < STAGES.index("compiled")
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    assert f'"timeout_s": {driver.COMMAND_TIMEOUT_S}' in docs and "bash benchmarks/gpu_run.sh" in docs


def test_a_stage_killed_at_its_limit_keeps_the_rows_it_wrote(tmp_path):
    """A stage writes a row, then hangs: its row is in results.json while it runs (a command killed from
    outside keeps it) and after the driver stops it at its limit."""
    ctx = driver.Context(tmp_path / "out", tmp_path / "work", tmp_path / "carry")
    rows = ctx.folder("slow") / "rows.json"
    script = f"import json, time; open({str(rows)!r}, 'w').write(json.dumps({{'row': 1}})); time.sleep(120)"
    stage = driver.Stage("slow", 8, [sys.executable, "-c", script], results=("rows.json",))
    seen_while_running = []

    def watch() -> None:
        while not seen_while_running:
            try:
                record = json.loads((ctx.out / "results.json").read_text())["stages"]["slow"]
            except (OSError, KeyError, ValueError):
                record = {}
            if record.get("status") == "running" and record.get("results", {}).get("rows.json") == {"row": 1}:
                seen_while_running.append(record)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    results = driver.run_stages(ctx, [stage], budget=60)
    watcher.join(timeout=1)
    record = results["stages"]["slow"]
    assert record["status"] == "timeout" and time.monotonic() - start < 8 + driver.STOP_GRACE_S + 5
    assert record["results"]["rows.json"] == {"row": 1} and seen_while_running


def test_a_rerun_counts_what_an_earlier_run_on_the_machine_did(tmp_path):
    ctx = driver.Context(tmp_path / "out", tmp_path / "work", tmp_path / "carry")
    ok = [sys.executable, "-c", "pass"]
    plan = [driver.Stage("first", 10, ok), driver.Stage("second", 10, ok, needs=("first",))]
    assert driver.run_stages(ctx, plan, 60, only={"second"})["stages"]["second"]["status"] == "skipped"
    driver.run_stages(ctx, plan, 60, only={"first"})
    results = driver.run_stages(ctx, plan, 60, only={"second"})
    assert list(results["stages"]) == ["second"] and results["stages"]["second"]["status"] == "ok"


def test_each_stage_gets_its_own_path_order(tmp_path, monkeypatch):
    """The tree, then the carried folders a stage asks for, then the carry's site; a probe of the plain path run
    from inside a server stage (the preflight) does not inherit that stage's numpy 1.26 and protobuf."""
    ctx = driver.Context(tmp_path / "out", tmp_path / "work", tmp_path / "carry")
    for name in ("site", "client", "numpy1"):
        ctx.installed(name).mkdir(parents=True)
    server = driver.Stage("server", 1, None, paths=driver.SERVER_PATHS)
    server_path = driver.stage_environment(ctx, server)["PYTHONPATH"].split(os.pathsep)
    expected = [str(REPO), str(ctx.installed("numpy1")), str(ctx.installed("client")), str(ctx.site)]
    assert server_path[:4] == expected
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*server_path, "/elsewhere"]))
    plain = driver.stage_environment(ctx, driver.Stage("plain", 1, None))["PYTHONPATH"].split(os.pathsep)
    assert plain == [str(REPO), str(ctx.site), "/elsewhere"]


def test_the_path_hook_gives_an_interpreter_that_ignores_pythonpath_its_entries(tmp_path):
    """Triton's stub embeds Python without PYTHONPATH (seen in the rehearsal: numpy 2 from site-packages, the
    carried numpy 1.26 and the tree not on its path). `python -E` ignores PYTHONPATH the same way; with the hook in
    a site folder it gets the entries first; an ordinary interpreter is left as it was."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    gpu_carry.install_path_hook(site_dir)
    where = "print(sys.path.index('/from/pythonpath'), len(sys.path))"
    code = f"import site, sys; site.addsitedir({str(site_dir)!r}); {where}"
    env = dict(os.environ, PYTHONPATH="/from/pythonpath")
    ignoring = subprocess.run([sys.executable, "-E", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert ignoring.stdout.split()[0] == "0"
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    index, length = map(int, plain.stdout.split())
    without = subprocess.run(
        [sys.executable, "-c", f"import sys; {where}"], env=env, capture_output=True, text=True, check=True
    )
    assert (index, length - 1) == tuple(map(int, without.stdout.split()))  # only the site folder added


def test_gpu_memory_is_counted_per_process_of_the_stage_tree():
    """nvidia-smi's compute apps by pid, kept only for the stage's own process tree (a real one here)."""
    tree = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        time.sleep(0.5)
        family = driver.descendants(tree.pid)
        assert tree.pid in family and len(family) == 3
        csv = "\n".join([f"{pid}, 1200" for pid in sorted(family)] + [f"{os.getpid()}, 70000", "[N/A], [N/A]"])
        used = driver.compute_apps(csv)
        assert {pid: mib for pid, mib in used.items() if pid in family} == dict.fromkeys(family, 1200)
        assert used[os.getpid()] == 70000  # another process on the card: not the stage's
    finally:
        tree.kill()
        tree.wait()


def test_the_parts_hand_the_gates_host_tensors_and_keep_the_rest_on_the_device():
    """What an entrance returns leaves its ensemble for a CPU-only gate: host memory. Tensors passed between parts
    stay where the runtime left them (here on the meta device, which cannot be copied: a copy would raise)."""
    produced = {t.name for sig in parts().values() for t in sig.outputs}
    returned = {name for e in entrances().values() for name in e.output_names}
    assert returned & produced <= GATE_TENSORS and {LOGIT, PROB, INDICES} <= GATE_TENSORS
    assert not GATE_TENSORS & {RESIDUAL, CLIP_FEAT}  # only passed between parts
    logit = torch.arange(8.0).reshape(2, 4).t()  # a view, as a runtime may return
    outputs = {LOGIT: logit, RESIDUAL: torch.empty(4, 8, device="meta"), CLIP_FEAT: torch.empty(4, 3, device="meta")}
    handed = handed_on(outputs)
    assert handed[LOGIT].device.type == "cpu" and handed[LOGIT].is_contiguous()
    assert torch.equal(handed[LOGIT], logit)
    assert handed[RESIDUAL].device.type == handed[CLIP_FEAT].device.type == "meta"


def test_admission_is_read_from_the_gates_config_as_the_server_reports_it(tiny_repository):
    """The gate's queue size, from its config as JSON (protobuf writes 64-bit integers as strings): answered
    clients resend before their instance frees, so its instances' batches cannot be counted on (the smoke run saw
    refusals at 72 and 68 clients); client counts above it are left out, the limit measured in their place."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    config = text_format.Parse((tiny_repository / IMAGE_ENTRANCE / "config.pbtxt").read_text(), mc.ModelConfig())
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    policy = {IMAGE_ENTRANCE: {**as_json, "max_batch_size": as_json["max_batch_size"]}}
    limit = admitted(policy, IMAGE_ENTRANCE)
    assert limit == DEFAULT_MAX_QUEUE_SIZE and config.instance_group[0].count == DEFAULT_ADMITTED_BATCHES
    assert concurrency_levels((1, 16, 256, 512), limit) == ([1, 16, limit], [256, 512])
    assert concurrency_levels((1, limit, 512), limit) == ([1, limit], [512])
    assert concurrency_levels((1, 4), limit) == ([1, 4], [])
    assert admitted(policy, "d3qe_pipeline") is None  # not a gate


def test_timed_windows_meet_no_batch_shape_the_warm_up_did_not_run():
    images = synthetic_images(5)
    seen: list[int] = []
    timed_batches(images, 2, 1, lambda pixels: seen.append(len(pixels)) or pixels.mean(axis=(1, 2, 3)), "shapes")
    warm, timed = seen[:-3], seen[-3:]
    assert timed == [2, 2, 1] and set(timed) <= set(warm)


@pytest.mark.server
@pytest.mark.slow
def test_the_served_warm_up_runs_every_batch_size_in_every_part(tiny_server, tiny_repository):
    import tritonclient.grpc as grpcclient

    def batch_counts() -> dict[str, dict[int, int]]:
        with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
            stats = c.get_inference_statistics(as_json=True)["model_stats"]
        return {
            m["name"]: {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in m.get("batch_stats", [])}
            for m in stats
        }

    max_batch = int(re.search(r"max_batch_size: (\d+)", (tiny_repository / "d3qe" / "config.pbtxt").read_text())[1])
    before = batch_counts()
    asyncio.run(warm_every_batch(tiny_server.endpoints.grpc_url, max_batch, 60))
    after = batch_counts()
    for part in ("vq_encoder", "clip_visual", "d3qe_head"):
        ran = {b for b, n in after[part].items() if n > before.get(part, {}).get(b, 0)}
        assert ran == set(range(1, max_batch + 1)), (part, ran)


def test_bf16_bounds_hold_the_full_size_measurements_of_the_validation_pool():
    """The export validates bf16 on a fixed pool (`export.validate.validation_pixels`): per batch (the first 1,
    3 and 8 images) the code agreement torch bf16 kept on the full-size seeded model (`d3qe fidelity`, committed)
    clears the bf16 floor, fp16 and ONNX Runtime fp32 theirs; the pool is the one measured."""
    from d3qe_serve.export.validate import validation_pixels

    report = json.loads((RESULTS / "cpu2c-intel-r-xeon-r-processor-2026-11-22" / "fidelity.json").read_text())
    assert report["model"]["preset"] == "full"
    _, names = validation_pixels([])
    pool = [report["images"].index(n.removeprefix("corpus:")) for n in names]
    rows = {r["config"]: r for r in report["rows"]}
    measured = (("torch bf16", "bf16"), ("torch fp16", "fp16"), ("model_repository: onnxruntime fp32", "fp32"))
    for config, family in measured:
        row = rows[config]
        assert row["image_indices"] == list(range(len(report["images"])))
        agreement = [1 - row["per_image_flips"][i] / 256 for i in pool]
        for batch in (1, 3, 8):
            assert np.mean(agreement[:batch]) >= TOLERANCES[family].min_index_agreement, (config, batch)
    bf16 = [1 - rows["torch bf16"]["per_image_flips"][i] / 256 for i in pool]
    assert round(float(np.mean(bf16)), 3) == 0.896 and min(bf16) < 0.7  # what export/validate.py states


def test_bf16_clip_bound_is_relative_so_the_features_scale_does_not_decide(tiny_checkpoint):
    """The tiny model's CLIP features in bf16 against fp32: the same verdict at the fixture's scale and at 100×
    it (a bigger model's features; bf16 rounds relative to the value), and a bug (every feature off by a fifth of
    the largest) fails at both. The full-size margin: the bound is over 4× what OpenVINO bf16 measured."""
    from d3qe_serve.d3qe import load_detector
    from d3qe_serve.d3qe.parts import part_specs
    from d3qe_serve.export.validate import synthetic_pixels

    model = load_detector(tiny_checkpoint)
    spec = part_specs(model.cfg)["clip_visual"]
    pixels = synthetic_pixels(4, model.cfg.image_size)
    with torch.inference_mode():
        ref = spec.module(model, torch.float32)(pixels).float().numpy()
        low = spec.module(model, torch.bfloat16)(pixels).float().numpy()
    assert np.abs(low - ref).max() > 0  # it did run in bf16
    bound = TOLERANCES["bf16"]
    for scale in (1.0, 100.0):
        measured = compare({CLIP_FEAT: low * scale}, {CLIP_FEAT: ref * scale}, ())
        assert problems(measured, bound) == [], scale
        broken = compare({CLIP_FEAT: (ref + 0.2 * np.abs(ref).max()) * scale}, {CLIP_FEAT: ref * scale}, ())
        assert problems(broken, bound), scale
    tune = json.loads((RESULTS / "cpu2c-amd-epyc-2026-12-07" / "tune-default.json").read_text())
    (openvino,) = [c for c in tune["parts"]["clip_visual"]["candidates"] if c["runtime"] == "openvino" and
                   c["precision"] == "bf16"]
    features = openvino["fidelity"]["feature_abs"]
    assert bound.bound(CLIP_FEAT, features["reference_max"]) >= 4 * features["max"]


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
    site, client = Path(installed["site"]), Path(installed["client"])
    assert {"open_clip", "ftfy", "wcwidth", "tritonclient", "rapidjson-stubs"} <= {p.name for p in site.iterdir()}
    # the client's transport apart: first on the path only where Triton is started or called
    assert {"grpc", "google", "ml_dtypes"} <= {p.name for p in client.iterdir()}
    assert not {"grpc", "google", "ml_dtypes"} & {p.name for p in site.iterdir()}
    version = (Path(installed["numpy1"]) / "numpy" / "version.py").read_text()
    assert 'version = "1.26.4"' in version
    install = find_tritonserver(site / "pytriton" / "tritonserver" / "bin" / "tritonserver")
    assert install.library_dirs == (site / "nvidia_pytriton.libs",)
    usage = subprocess.run(
        [str(install.binary), "--help"], env=server_environment(install), capture_output=True, text=True, timeout=60
    )
    assert "error while loading shared libraries" not in usage.stderr
    assert "--model-repository" in usage.stdout + usage.stderr


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(1800)
def test_the_rehearsal_installs_a_carry_and_its_preflight_gates_pass(tmp_path):
    """The rehearsal's cheap part, as CI can run it: a carry of the run's versions built from PyPI for this
    interpreter (needs the network; the GPU machine's is cp312, which cannot import here), installed by the run's
    install stage, then the gating preflight under the carried path order: numpy 1.26, grpcio, protobuf and
    ml_dtypes from the carry first where Triton runs, the image's (here the venv's) own `import onnx` elsewhere,
    and a one-model server started from the carried binary and stub. About 2 minutes (xz of the server)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    carry = tmp_path / "carry"
    gpu_carry.build(carry, python=version)
    out, work = tmp_path / "out", tmp_path / "work"
    folders = ["--carry", str(carry), "--out", str(out), "--work", str(work)]
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--smoke", "--stages", "install", "preflight", *folders],
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads((out / "results.json").read_text())["stages"]
    assert done.returncode == 0, {n: s.get("log_tail") for n, s in results.items()}
    found = results["preflight"]["results"]["preflight.json"]
    assert found["passed"], found["gates"]
    server_path = found["imports_server_path"]["modules"]
    assert server_path["numpy"] == "1.26.4" and str(work / "install" / "numpy1") in server_path["numpy from"]
    assert str(work / "install" / "client") in server_path["google.protobuf from"]
    client_path = found["imports_client_path"]["modules"]  # the `d3qe` command imports tritonclient
    assert str(work / "install" / "client") in client_path["grpc from"] and "numpy1" not in client_path["numpy from"]
    plain = found["imports_plain_path"]["modules"]
    assert str(work / "install") not in plain["google.protobuf from"] and plain["onnx"]
    assert found["libpython"]["resolved"] and not found["libpython"]["not_found"]
    assert found["carry"]["python"] == version
