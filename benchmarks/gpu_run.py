"""The GPU run: on the GPU machine, one command installs the carry, then validates and measures, in order of value.

    bash benchmarks/gpu_run.sh                        # there: results in $OUT (`make gpu-carry` first, here)
    bash benchmarks/gpu_run.sh --stages compiled --limits compiled=300   # the rerun, on the machine kept warm
    bash benchmarks/gpu_run.sh --smoke                # here: every stage on this CPU, the tiny model, tiny sizes

The script runs `d3qe gpu-run` (cli/gpu_run.py), whose options map onto `Context` and `gpu_run`.

One device command may run `COMMAND_TIMEOUT_S` (420 s) so that a rerun fits in the 15 minutes of GPU time an
issue gets (machine starts included). The stages (`stages`) share `RUN_BUDGET_S` of it and their limits add up
to it exactly, in order of value: install; a preflight that gates (libpython for the stub, the imports under
each stage's path, a one-model Triton server answering); the bf16 export; the headline (strict fp32 eager,
then the ensemble served over gRPC, image bytes and decoded pixels); parity per precision; the kernel's CUDA
tests and benchmark; compiled + CUDA graphs last. Each stage runs in its own process group
(`serving.process.SupervisedProcess`) under its limit; a stage that fails or times out is recorded and the
next one runs; one that needs a failed one is skipped with the reason.

Rows are kept the moment they exist: the stages write their JSON as they measure, the driver copies a running
stage's files into `results.json` every `COLLECT_EVERY_S` (a run killed from outside keeps them too) and
after it ends, with its status, seconds, command, markdown, log tail on failure and peak GPU memory of each of
its processes (nvidia-smi's compute apps, the stage's process tree only). Every line a stage prints goes to
`log.txt` as it comes; the headline's Triton log is copied out whole. `--out` stays within what a device run
returns (at most 8 files, one folder).

The carry (`benchmarks.gpu_carry`, `d3qe gpu-carry`) is installed under `--work` (in /tmp, never the tree):
its site folder on every stage's path; the client's grpcio/protobuf/ml_dtypes first on the paths of the stages
that run the `d3qe` command or Triton, numpy 1.26 too where Triton runs (`Stage.paths`), so that the kernel's
tests import the image's own onnx with the image's protobuf and numpy. Triton's stubs embed Python without
PYTHONPATH: the install stage gives the run's interpreter a `.pth` that adds it (`gpu_carry.install_path_hook`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from d3qe_serve.benchmarks.gpu_carry import PYTHON
from d3qe_serve.contract import IMAGE_ENTRANCE, RGB_ENTRANCE
from d3qe_serve.errors import InputError
from d3qe_serve.serving.process import SupervisedProcess

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "gpu-run"  # where $OUT is not set
DEFAULT_WORK = Path("/tmp/d3qe-gpu-run")
DEVICE_TIME_S = 900  # GPU time an issue gets, machine starts included
MACHINE_START_S = 60  # a start seen here; 1-2 minutes
COMMAND_TIMEOUT_S = 420  # the device call's timeout_s: it and a rerun fit DEVICE_TIME_S with one start
STOP_GRACE_S = 5  # a stage out of time gets SIGTERM, then SIGKILL to its group after this
DRIVER_MARGIN_S = 25  # the interpreter's start, the last writes
RUN_BUDGET_S = COMMAND_TIMEOUT_S - STOP_GRACE_S - DRIVER_MARGIN_S  # what the stages' limits add up to
SMOKE_BUDGET_S = 2400  # a shared 2-core machine: the tiny stages' limits are generous, not measurements
MIN_STAGE_S = 10  # a stage is not started with less than this left
COLLECT_EVERY_S = 5.0
KERNEL_TESTS = "tests/test_attention.py"
TAIL_LINES = 60
INJECTED = "injected failure (--fail)"
CARRIED = ("numpy1", "client")  # install folders a stage may put first on its path (`Stage.paths`)
SERVER_PATHS = CARRIED  # Triton's python backend takes numpy < 2 and the stubs take the launcher's path
CLIENT_PATHS = ("client",)  # the `d3qe` command imports tritonclient (cli/options.py): its grpcio and protobuf
HEADLINE_CONCURRENCY = (16, 32, 64)  # clients; the gates admit 64 (`bench.admitted`: their queue)
SMOKE_CONCURRENCY = (1, 4, 100)  # 100: above the gates' admission (64), measured at 64


@dataclass(frozen=True)
class Stage:
    """One step of the run: a command, or the reason it does not run here."""

    name: str
    limit_s: float
    argv: list[str] | None  # None: skipped, `why` says why
    why: str = ""
    needs: tuple[str, ...] = ()  # stages that must have succeeded (this run, or an earlier one: `--stages`)
    paths: tuple[str, ...] = ()  # of CARRIED: first on its path
    results: tuple[str, ...] = ()  # globs in its folder: JSON (or JUnit XML) copied into results.json
    markdown: tuple[str, ...] = ()  # globs in its folder: markdown copied into results.json
    plot: str | None = None  # a glob in its folder: the PNG copied to --out as <stage>.png
    logs: tuple[str, ...] = ()  # files in its folder copied to --out as <stage>-<name> (a server's log)


@dataclass
class Context:
    out: Path
    work: Path
    carry: Path
    python: str = sys.executable
    results: dict = field(default_factory=dict)

    def folder(self, stage: str) -> Path:
        return self.work / stage

    def installed(self, name: str) -> Path:
        """An install folder of the carry: site, client or numpy1."""
        return self.folder("install") / name

    @property
    def site(self) -> Path:
        return self.installed("site")


def stages(ctx: Context, smoke: bool) -> list[Stage]:
    """The run's stages in order of value: full size on CUDA, or (`smoke`) the same orchestration on this CPU at
    tiny sizes. On CUDA their limits add up to `RUN_BUDGET_S`."""
    py, f = ctx.python, ctx.folder
    d3qe = [py, "-m", "d3qe_serve.cli.main"]
    driver = [*d3qe, "gpu-run", "--work", str(ctx.work), "--carry", str(ctx.carry)] + (["--smoke"] if smoke else [])
    repo = str(f("export") / "repo")
    device = "cpu" if smoke else "cuda"
    # The stubs' path hook goes into the run's interpreter, never the dev venv's (there everything is installed).
    dev_venv = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
    unpack = [*d3qe, "gpu-carry", "unpack", str(ctx.carry), str(f("install"))] + ([] if dev_venv else ["--path-hook"])
    no_carry = smoke and not (ctx.carry / "manifest.json").is_file()
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--timeout", "60", "--rootdir", str(REPO)]
    # on a CPU the CUDA tests skip: the tests of what the kernel reads and picks run in their place
    kernel_tests = "precision or switches or sees_a_spilling" if smoke else "cuda"
    bench_files = {"results": ("bench.json",), "markdown": ("bench.md",), "plot": "bench.png"}

    def limit(on_gpu: float, here: float) -> float:
        """A stage's seconds: on the GPU machine (16 cores, they add up to `RUN_BUDGET_S`), or on this shared
        2-core CPU at tiny sizes."""
        return here if smoke else on_gpu

    return [
        Stage(
            "install",
            limit(25, 240),
            None if no_carry else unpack,
            "no carry here (`make gpu-carry`); the venv has what it holds",
            results=("installed.json",),
        ),
        Stage(
            "preflight",
            limit(35, 240),
            [*driver, "--stage", "preflight"],
            needs=() if no_carry else ("install",),
            paths=SERVER_PATHS,
            results=("preflight.json",),
            logs=("triton.log",),
        ),
        Stage(
            "export",
            limit(80, 600),
            [*d3qe, "export", "--runtime", "torch", "--precision", "bf16", "--device", device, "--out", repo]
            + (["--preset", "tiny", "--max-batch", "4"] if smoke else ["--preset", "full", "--max-batch", "64"]),
            needs=() if no_carry else ("install",),
            paths=CLIENT_PATHS,
            results=("repo/manifest.json",),
        ),
        Stage(
            "headline",
            limit(110, 600),
            [*driver, "--stage", "headline"],
            needs=("export", "preflight"),
            paths=SERVER_PATHS,
            logs=("triton.log",),
            **bench_files,
        ),
        Stage(
            "parity",
            limit(60, 480),
            [*d3qe, "fidelity", "--repo", repo, "--device", device, "--out", str(f("parity"))]
            + (
                ["--torch", "fp32", "bf16", "--limit", "4", "--batch-size", "4"]
                if smoke
                else ["--torch", "fp32", "tf32", "bf16", "fp16", "--limit", "64", "--batch-size", "16"]
            ),
            needs=("export",),
            paths=CLIENT_PATHS,
            results=("fidelity.json",),
            markdown=("fidelity.md",),
            plot="fidelity.png",
        ),
        Stage(
            "kernel-tests",
            limit(25, 240),
            [*pytest, "--junitxml", str(f("kernel-tests") / "junit.xml"), "-k", kernel_tests, KERNEL_TESTS],
            results=("junit.xml",),
        ),
        Stage(
            "kernel-bench",
            limit(20, 180),
            [*d3qe, "bench-attention", "--out", str(f("kernel-bench"))]
            + (
                ["--device", "cpu", "--batches", "1", "--length", "64", "--min-run-time", "0.02"]
                if smoke
                else ["--device", "cuda", "--batches", "1", "9", "64", "--min-run-time", "0.5"]
            ),
            results=("attention-*.json",),
            plot="attention-*.png",
        ),
        Stage(
            "compiled",
            limit(35, 35),
            None if smoke else [*driver, "--stage", "compiled"],
            "torch.compile with CUDA graphs is measured on CUDA only (Inductor takes minutes on this CPU)",
            needs=("export",),
            paths=CLIENT_PATHS,
            results=("compile.json", "bench.json"),
            markdown=("bench.md",),
        ),
    ]


def stage_environment(ctx: Context, stage: Stage) -> dict[str, str]:
    """The tree first, then the carried folders the stage asks for (`Stage.paths`), then the carry's site folder;
    the image's site-packages after all of them."""
    carried = [ctx.installed(name) for name in stage.paths if ctx.installed(name).is_dir()]
    paths = [str(REPO), *map(str, carried)] + ([str(ctx.site)] if ctx.site.is_dir() else [])
    # the caller's own path after them, less the carry's folders (a stage's probe of another path must not inherit
    # the stage's own order)
    install = ctx.folder("install")
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    inherited = [p for p in inherited if not Path(p).resolve().is_relative_to(install.resolve())]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")  # progress bars: a line every 5 s in the log
    env["PYTHONPATH"] = os.pathsep.join([*paths, *inherited])
    return env


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc: Triton's stubs are the server's children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        pid, ppid = int(stat.parent.name), int(text.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += parents.get(pid, [])
    return found


def compute_apps(csv: str) -> dict[int, int]:
    """nvidia-smi's `--query-compute-apps=pid,used_memory --format=csv,noheader,nounits`: MiB by pid."""
    used = {}
    for line in csv.splitlines():
        pid, _, mib = (cell.strip() for cell in line.partition(","))
        if pid.isdigit() and mib.isdigit():
            used[int(pid)] = int(mib)
    return used


class GpuMemory:
    """Peak GPU memory (MiB) of each process of a stage's tree while it runs, sampled every `period` seconds:
    nvidia-smi's per-process figures (not the card's, which holds other processes' too), and their largest sum."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.root: int | None = None
        self.peaks: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self.total_peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set() and shutil.which("nvidia-smi"):
            csv = _sh("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
            if self.root is not None:
                mine = {pid: mib for pid, mib in compute_apps(csv).items() if pid in descendants(self.root)}
                for pid, mib in mine.items():
                    self.peaks[pid] = max(self.peaks.get(pid, 0), mib)
                    if pid not in self.commands:
                        self.commands[pid] = _cmdline(pid)
                if mine:
                    self.total_peak = max(self.total_peak or 0, sum(mine.values()))
            self._stop.wait(self.period)

    def record(self) -> dict:
        per_process = {str(pid): {"mib": mib, "command": self.commands.get(pid, "")} for pid, mib in self.peaks.items()}
        return {"gpu_memory_peak_mib_per_process": per_process, "gpu_memory_peak_mib_stage": self.total_peak}

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def read_result(path: Path) -> dict | list:
    """A results file's content: JSON as is; JUnit XML as its counts and the failed tests' names."""
    if path.suffix != ".xml":
        return json.loads(path.read_text())
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**counts, "failed": failed}


def collect(ctx: Context, stage: Stage, record: dict) -> None:
    """The stage's results files, markdown, plot and logs into the record and --out (what exists: a running or
    failed stage's too)."""
    folder = ctx.folder(stage.name)
    for pattern in stage.results:
        for path in sorted(folder.glob(pattern)):
            try:
                record.setdefault("results", {})[path.relative_to(folder).as_posix()] = read_result(path)
            except (ValueError, ET.ParseError) as e:  # half written: the next collection reads it whole
                record.setdefault("results", {})[path.name] = {"unreadable": str(e)}
    for pattern in stage.markdown:
        for path in sorted(folder.glob(pattern)):
            record.setdefault("markdown", {})[path.name] = path.read_text()
    if stage.plot and (plots := sorted(folder.glob(stage.plot))):
        shutil.copyfile(plots[0], ctx.out / f"{stage.name}.png")
        record["plot"] = f"{stage.name}.png"
    for name in stage.logs:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, ctx.out / f"{stage.name}-{name}")
            record.setdefault("logs", []).append(f"{stage.name}-{name}")


def write_results(ctx: Context) -> None:
    tmp = ctx.out / ".results.json.tmp"
    tmp.write_text(json.dumps(ctx.results, indent=1, default=str) + "\n")
    tmp.replace(ctx.out / "results.json")


def _unmet(ctx: Context, stage: Stage, selected: set[str]) -> list[str]:
    """The stages `stage` needs that did not succeed: in this run, or (not run now) in an earlier one."""
    unmet = []
    for need in stage.needs:
        if need in selected:
            ok = ctx.results["stages"].get(need, {}).get("status") == "ok"
        else:
            ok = (ctx.folder(need) / ".ok").is_file()
        if not ok:
            unmet.append(need)
    return unmet


def run_stage(ctx: Context, stage: Stage, argv: list[str], timeout: float, record: dict, log: IO[str]) -> None:
    """Run one stage in its own process group, each output line to `log` and stdout, its files collected into
    `record` and results.json every `COLLECT_EVERY_S` while it runs; stopped after `timeout` s."""
    lock = threading.Lock()
    process = SupervisedProcess(
        argv, env=stage_environment(ctx, stage), cwd=REPO, sinks=[log, sys.stdout], tail_lines=TAIL_LINES
    )
    t0 = time.monotonic()
    with GpuMemory() as memory:
        process.start()
        memory.root = process.pid
        done = threading.Event()

        def keep_collecting() -> None:
            while not done.wait(COLLECT_EVERY_S):
                with lock:
                    collect(ctx, stage, record)
                    record.update(status="running", seconds=round(time.monotonic() - t0, 1), **memory.record())
                    write_results(ctx)

        collector = threading.Thread(target=keep_collecting, daemon=True)
        collector.start()
        rc = process.wait(timeout)
        if rc is None:
            process.stop(STOP_GRACE_S, group=True)
        done.set()
        collector.join()
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    record |= {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "command": argv}
    record |= memory.record()
    if status != "ok":
        record["log_tail"] = "".join(process.tail)
    collect(ctx, stage, record)
    if status == "ok":
        (ctx.folder(stage.name) / ".ok").touch()


def run_stages(
    ctx: Context,
    plan: list[Stage],
    budget: float,
    fail: set[str] = frozenset(),
    only: set[str] | None = None,
) -> dict:
    """Every stage of `plan` (those in `only`, if given) in turn within `budget` seconds; results.json and log.txt
    kept current. Returns the results."""
    start = time.monotonic()
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    selected = {s.name for s in plan} if only is None else set(only)
    ctx.results = {
        "run": {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget,
            "limits_s": {s.name: s.limit_s for s in plan},
            "work": str(ctx.work),
            "carry": str(ctx.carry),
            "stages": [s.name for s in plan if s.name in selected],
            "complete": False,
        },
        "stages": {},
    }
    write_results(ctx)
    with (ctx.out / "log.txt").open("a") as log:
        for i, stage in enumerate(plan, 1):
            if stage.name not in selected:
                continue
            left = budget - (time.monotonic() - start)
            record: dict = {"limit_s": stage.limit_s}
            ctx.results["stages"][stage.name] = record
            unmet = _unmet(ctx, stage, selected)
            if stage.argv is None:
                record |= {"status": "skipped", "reason": stage.why}
            elif unmet:
                record |= {"status": "skipped", "reason": f"needs {', '.join(unmet)}, which did not succeed"}
            elif left < MIN_STAGE_S:
                record |= {"status": "skipped", "reason": f"out of time: {left:.0f} s of the {budget:.0f} s left"}
            else:
                injected = [ctx.python, "-c", f"import sys; sys.exit({INJECTED!r})"]
                argv = stage.argv if stage.name not in fail else injected
                timeout = min(stage.limit_s, left)
                shutil.rmtree(ctx.folder(stage.name), ignore_errors=True)  # nothing of an earlier run is collected
                ctx.folder(stage.name).mkdir(parents=True)
                header = f"\n=== [{i}/{len(plan)}] {stage.name} (at most {timeout:.0f} s): {' '.join(argv)}\n"
                log.write(header)
                log.flush()
                print(header, end="", flush=True)
                run_stage(ctx, stage, argv, timeout, record, log)
            line = f"=== {stage.name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "")
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
            write_results(ctx)
    ctx.results["run"] |= {"complete": True, "seconds": round(time.monotonic() - start, 1)}
    write_results(ctx)
    return ctx.results


def gpu_run(
    ctx: Context,
    *,
    smoke: bool = False,
    budget: float | None = None,
    fail: Iterable[str] = (),
    only: Iterable[str] | None = None,
    limits: Mapping[str, float] | None = None,
) -> dict:
    """The run's stages (`smoke`: on this CPU at tiny sizes) within `budget` seconds (default `RUN_BUDGET_S`, smoke
    `SMOKE_BUDGET_S`); `only`: these stages alone (a rerun: what they need counts as done if an earlier run on
    this machine did it); `limits`: stage limits replaced (a rerun's); the stages in `fail` fail on purpose.
    InputError for a name that is no stage. Returns the results, also in `ctx.out`/results.json."""
    plan = stages(ctx, smoke)
    names = {s.name for s in plan}
    limits = dict(limits or {})
    unknown = (set(fail) | set(only or ()) | set(limits)) - names
    if unknown:
        raise InputError(f"no stage {sorted(unknown)}; the stages are {[s.name for s in plan]}")
    plan = [dataclasses.replace(s, limit_s=limits.get(s.name, s.limit_s)) for s in plan]
    budget = budget or (SMOKE_BUDGET_S if smoke else RUN_BUDGET_S)
    return run_stages(ctx, plan, budget, set(fail), None if only is None else set(only))


# ----------------------------------------------------------------------------------------------- the stages


def _sh(*argv: str, env: dict | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    return (done.stdout + done.stderr).strip()


def _probe(fn):
    """`fn()`, or the error it raised: one failing check must not hide the others."""
    try:
        return fn()
    except Exception as e:  # any failure is itself the finding
        return {"error": f"{type(e).__name__}: {e}"}


# What each kind of stage imports under its own path (`Stage.paths`), checked by the preflight: the stages that
# start Triton, those that run the `d3qe` command, and the kernel's (pytest, bench-attention).
IMPORTS = {
    SERVER_PATHS: (
        "numpy",
        "torch",
        "PIL",
        "open_clip",
        "tritonclient.grpc",
        "d3qe_serve.serving.server",
        "d3qe_serve.benchmarks.bench",
    ),
    CLIENT_PATHS: (
        "numpy",
        "torch",
        "onnx",
        "open_clip",
        "skimage",
        "tritonclient.grpc",
        "d3qe_serve.cli.options",
        "d3qe_serve.export.driver",
        "d3qe_serve.benchmarks.fidelity",
        "d3qe_serve.benchmarks.bench",
    ),
    (): (
        "numpy",
        "torch",
        "triton",
        "onnx",
        "onnxruntime",
        "open_clip",
        "d3qe_serve.d3qe.attention_kernel",
        "d3qe_serve.export.onnx_attention",
        "d3qe_serve.benchmarks.attention",
    ),
}
PATH_NAMES = {SERVER_PATHS: "server_path", CLIENT_PATHS: "client_path", (): "plain_path"}


def check_imports(ctx: Context, paths: tuple[str, ...], modules: Iterable[str]) -> dict:
    """`modules` imported in a fresh interpreter under a stage's path: each one's version or error, and
    where numpy and protobuf came from."""
    code = (
        "import importlib, json, sys\n"
        "found = {}\n"
        f"for name in {list(modules)!r}:\n"
        "    try:\n"
        "        m = importlib.import_module(name)\n"
        "        found[name] = getattr(m, '__version__', 'ok')\n"
        "    except Exception as e:\n"
        "        found[name] = {'error': f'{type(e).__name__}: {e}'[:500]}\n"
        "for name in ('numpy', 'google.protobuf', 'grpc'):\n"
        "    m = sys.modules.get(name)\n"
        "    if m is not None:\n"
        "        found[name + ' from'] = getattr(m, '__file__', None)\n"
        "print(json.dumps(found))\n"
    )
    env = stage_environment(ctx, Stage("probe", 0, None, paths=paths))
    done = subprocess.run([ctx.python, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:]}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [m for m in modules if isinstance(found.get(m), dict)]
    return {"modules": found, "failed": failed}


def libpython() -> dict:
    """Whether the stub's libpython loads: `ldd` of this Python's stub in the server that `find_tritonserver` takes
    (the carried one once the carry's site is on the path), in the environment the server gets
    (`server_environment`: its libraries, and this interpreter's LIBDIR where it has a shared libpython). The
    wheel does not bundle libpython3.12: the image must have it."""
    from d3qe_serve.serving.install import find_tritonserver, server_environment

    install = find_tritonserver()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = (install.stubs / version if install.stubs else install.backends / "python") / "triton_python_backend_stub"
    env = server_environment(install)
    lines = _sh("ldd", str(stub), env=env).splitlines() if stub.is_file() else [f"{stub} not found"]
    return {
        "stub": str(stub),
        "needs": f"libpython{version}.so.1.0",
        "resolved": [ln.strip() for ln in lines if "libpython" in ln],
        "not_found": [ln.strip() for ln in lines if "not found" in ln],
        "ld_library_path": env.get("LD_LIBRARY_PATH"),
        "ldconfig": [ln.strip() for ln in _sh("ldconfig", "-p").splitlines() if "libpython3" in ln],
    }


def one_model_server(folder: Path) -> dict:
    """A Triton server with the python backend and one model (`check_pixels`: no weights) started from this
    interpreter, one request answered, stopped: the stub, libpython, numpy < 2 and the backend work here. Its
    log goes to `folder`/triton.log."""
    from importlib import resources

    import numpy as np
    import tritonclient.grpc as grpcclient
    from google.protobuf import text_format

    from d3qe_serve.contract import PIXELS, TensorSpec
    from d3qe_serve.serving.endpoints import free_endpoints
    from d3qe_serve.serving.repository import CHECKED, MODELS_PACKAGE, VERSION, check_pixels_config
    from d3qe_serve.serving.server import TritonServer

    size = 16
    repo = folder / "repo"
    config = check_pixels_config(1, TensorSpec(PIXELS, "float32", (-1, 3, size, size)), 0)
    (repo / config.name / VERSION).mkdir(parents=True, exist_ok=True)
    (repo / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    model = (resources.files(MODELS_PACKAGE) / "check_pixels.py").read_bytes()
    (repo / config.name / VERSION / "model.py").write_bytes(model)
    t0 = time.monotonic()
    with (folder / "triton.log").open("w") as log, TritonServer(repo, free_endpoints(), log=log) as server:
        ready = time.monotonic() - t0
        pixels = np.full((1, 3, size, size), 0.5, dtype=np.float32)
        with grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client:
            feed = grpcclient.InferInput(PIXELS, list(pixels.shape), "FP32")
            feed.set_data_from_numpy(pixels)
            answer = client.infer(config.name, [feed]).as_numpy(CHECKED)
    if answer is None or not np.array_equal(answer, pixels):
        raise RuntimeError(f"{config.name} answered {answer!r}, not its input")
    return {"ready_s": round(ready, 1), "answered": True}


def preflight(ctx: Context, folder: Path) -> dict:
    """What the later stages rely on, each a gate: the stub's libpython, the imports of each kind of stage under
    its path, one model served; and facts to read (GPU, versions, /dev/shm). `gates` says which failed."""
    from d3qe_serve.serving.host import machine, tool_versions

    def torch_info() -> dict:
        import torch

        info = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {"device": props.name, "capability": list(torch.cuda.get_device_capability(0))}
            info |= {"memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
        return info

    def shm() -> dict:
        usage = shutil.disk_usage("/dev/shm")
        return {"total_gib": round(usage.total / 2**30, 1), "free_gib": round(usage.free / 2**30, 1)}

    found = {
        "python": {"version": sys.version, "executable": sys.executable, "carry_for": PYTHON},
        "libpython": _probe(libpython),
        **{
            f"imports_{PATH_NAMES[paths]}": _probe(lambda p=paths, m=modules: check_imports(ctx, p, m))
            for paths, modules in IMPORTS.items()
        },
        # informative: under the server path, onnx (no server stage needs it) and matplotlib (the headline's plot)
        "others_under_server_path": _probe(lambda: check_imports(ctx, SERVER_PATHS, ("onnx", "matplotlib.pyplot"))),
    }
    found["one_model_server"] = _probe(lambda: one_model_server(folder))
    found |= {
        "nvidia_smi": _probe(
            lambda: _sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv")
        ),
        "torch": _probe(torch_info),
        "versions": _probe(tool_versions),
        "machine": _probe(machine),
        "dev_shm": _probe(shm),
        "tmp_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1),
        "carry": _probe(lambda: json.loads((ctx.folder("install") / "installed.json").read_text())["manifest"]),
    }
    lib = found["libpython"]
    gates = {
        "libpython": "error" not in lib and not lib["not_found"],
        **{f"imports_{n}": not found[f"imports_{n}"].get("failed", ["?"]) for n in PATH_NAMES.values()},
        "one_model_server": found["one_model_server"].get("answered", False),
    }
    return {"gates": gates, "passed": all(gates.values()), **found}


def headline(ctx: Context, folder: Path, smoke: bool) -> dict:
    """Strict fp32 eager (the × eager reference), then the bf16 export served over gRPC, image bytes in and
    decoded pixels, at the client counts the gates admit: bench.json in `folder` after every row."""
    from d3qe_serve.benchmarks.bench import PROFILES, bench
    from d3qe_serve.serving.inprocess import WeightOptions

    if smoke:
        profile = dataclasses.replace(
            PROFILES["cpu"], images=8, eager_batches=(4,), concurrency=SMOKE_CONCURRENCY, min_requests=8
        )
    else:
        profile = dataclasses.replace(PROFILES["gpu"], concurrency=HEADLINE_CONCURRENCY, min_requests=1024)
    repo = ctx.folder("export") / "repo"
    models = (IMAGE_ENTRANCE, RGB_ENTRANCE)
    results = bench(profile=profile, weights=WeightOptions(), repos=[repo], models=models, in_process=False, out=folder)
    return results.report


def compiled(ctx: Context, folder: Path) -> dict:
    """The bf16 export's torch parts through torch.compile with CUDA graphs, in-process: first the cold compile
    at the timed batch size, timed and written at once (compile.json), then the timed run beside strict fp32
    eager (bench.json, the compile cache warm by then)."""
    import numpy as np

    from d3qe_serve.benchmarks.bench import PROFILES, bench, synthetic_images
    from d3qe_serve.d3qe import preprocess
    from d3qe_serve.serving.inprocess import WeightOptions, load_exported, run_parts

    profile = PROFILES["gpu"]
    repo = ctx.folder("export") / "repo"
    record = {"batch": profile.runtime_batch, "started": time.time()}
    (folder / "compile.json").write_text(json.dumps(record))
    t0 = time.perf_counter()
    runners = load_exported(repo, profile.device, compile=True)
    images = synthetic_images(profile.runtime_batch)
    run_parts(runners, np.stack([preprocess(image).numpy() for image in images]))
    record["compile_and_first_run_s"] = round(time.perf_counter() - t0, 1)
    (folder / "compile.json").write_text(json.dumps(record))
    del runners
    results = bench(profile=profile, weights=WeightOptions(), repos=[repo], server=False, compile=True, out=folder)
    return results.report


def run_driver_stage(ctx: Context, name: str, smoke: bool) -> int:
    """A stage the driver itself implements, in this process (`--stage`): its JSON in its folder. Returns the
    exit code: 1 where the preflight's gates did not all pass."""
    folder = ctx.folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "preflight":
        found = preflight(ctx, folder)
        (folder / "preflight.json").write_text(json.dumps(found, indent=1, default=str) + "\n")
        failed = [gate for gate, ok in found["gates"].items() if not ok]
        print(f"preflight gates: {found['gates']}" + (f"; failed: {failed}" if failed else ""), flush=True)
        return 1 if failed else 0
    if name == "headline":
        headline(ctx, folder, smoke)
        return 0
    if name == "compiled":
        compiled(ctx, folder)
        return 0
    raise InputError(f"--stage {name}: the driver runs preflight, headline and compiled")
