"""The GPU run: on the GPU machine, one command installs the carry and validates and measures everything.

    bash benchmarks/gpu_run.sh                    # there: results in $OUT (`make gpu-carry` first, here)
    bash benchmarks/gpu_run.sh --smoke            # here: every stage on this CPU, the tiny model, tiny sizes

The script runs `d3qe gpu-run` (cli/gpu_run.py), whose options map onto `Context` and `gpu_run`.

Stages run in order (`stages`), each in its own process group (`serving.process.SupervisedProcess`) under
its own time limit and the whole run's `--budget`: a stage that fails or times out is recorded and the next
one runs; a stage that needs a failed one, or that no longer fits in the time left, is skipped with the
reason. After each stage `results.json` in `--out` is rewritten (status, seconds, command, its results
files' contents, its markdown tables, the tail of its log on failure, the peak GPU memory nvidia-smi saw
while it ran), its plot copied beside it, and every line any stage prints is appended to `log.txt` as it
comes: a crash or a kill loses only the stage in flight. `--out` stays within what a device run returns
(at most 8 files, one folder).

The carry (`benchmarks.gpu_carry`, `d3qe gpu-carry`) is installed under `--work` (in /tmp, never the tree):
its site folder on every stage's path, numpy 1.26 first on the path of the stage that starts Triton (its
python backend takes numpy < 2; the image's numpy 2 stays for the others).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from d3qe_serve.benchmarks.gpu_carry import PYTHON, SERVER_FILES
from d3qe_serve.contract import IMAGE_ENTRANCE, RGB_ENTRANCE
from d3qe_serve.errors import InputError
from d3qe_serve.serving.process import SupervisedProcess

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "gpu-run"  # where $OUT is not set
DEFAULT_WORK = Path("/tmp/d3qe-gpu-run")
BUDGET_S = 530  # of the 600 s one device command may run: install, every stage, and margin
SMOKE_BUDGET_S = 300
MIN_STAGE_S = 15  # a stage is not started with less than this left
STOP_GRACE_S = 15  # a stage out of time gets SIGTERM, then SIGKILL after this
TAIL_LINES = 60
INJECTED = "injected failure (--fail)"


@dataclass(frozen=True)
class Stage:
    """One step of the run: a command, or the reason it does not run here."""

    name: str
    budget_s: float
    argv: list[str] | None  # None: skipped, `why` says why
    why: str = ""
    needs: tuple[str, ...] = ()  # stages that must have succeeded
    numpy1: bool = False  # numpy < 2 first on its path: it starts Triton's python backend
    results: tuple[str, ...] = ()  # globs in its folder: JSON (or JUnit XML) copied into results.json
    markdown: tuple[str, ...] = ()  # globs in its folder: markdown copied into results.json
    plot: str | None = None  # a glob in its folder: the PNG copied to --out as <stage>.png


@dataclass
class Context:
    out: Path
    work: Path
    carry: Path
    python: str = sys.executable
    results: dict = field(default_factory=dict)

    def folder(self, stage: str) -> Path:
        return self.work / stage

    @property
    def site(self) -> Path:
        return self.folder("install") / "site"

    @property
    def numpy1(self) -> Path:
        return self.folder("install") / "numpy1"


def stages(ctx: Context, smoke: bool) -> list[Stage]:
    """The run's stages: full size on CUDA, or (`smoke`) the same orchestration on this CPU at tiny sizes."""
    py, f = ctx.python, ctx.folder
    d3qe = [py, "-m", "d3qe_serve.cli.main"]
    driver = [*d3qe, "gpu-run", "--work", str(ctx.work), "--carry", str(ctx.carry)]
    repo = str(f("export") / "repo")
    bench = [*d3qe, "bench", "--repo", repo]
    bench += ["--profile", "cpu", "--images", "4"] if smoke else ["--profile", "gpu"]
    bench_files = {"results": ("bench.json",), "markdown": ("bench.md",), "plot": "bench.png"}
    if smoke:
        install = Stage(
            "install", 30, None, f"the carry is {PYTHON} wheels for the GPU machine; here the venv has them"
        )
    else:
        install = Stage(
            "install",
            60,
            [*d3qe, "gpu-carry", "unpack", str(ctx.carry), str(f("install"))],
            results=("installed.json",),
        )
    device = "cpu" if smoke else "cuda"
    return [
        install,
        Stage(
            "preflight",
            45,
            [*driver, "--preflight", str(f("preflight") / "preflight.json")],
            results=("preflight.json",),
        ),
        Stage(
            "kernel-tests",
            90,
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(f("kernel-tests") / "junit.xml")]
            + (["-k", "math"] if smoke else [])
            + ["tests/test_attention.py"],
            results=("junit.xml",),
        ),
        Stage(
            "kernel-bench",
            60,
            [*d3qe, "bench-attention", "--out", str(f("kernel-bench"))]
            + (
                ["--device", "cpu", "--batches", "1", "--length", "64", "--min-run-time", "0.02"]
                if smoke
                else ["--device", "cuda", "--batches", "1", "8", "64", "--min-run-time", "1"]
            ),
            results=("attention-*.json",),
            plot="attention-*.png",
        ),
        Stage(
            "export",
            120,
            [*d3qe, "export", "--runtime", "torch", "--precision", "bf16", "--device", device, "--out", repo]
            + (["--preset", "tiny", "--max-batch", "4"] if smoke else ["--preset", "full", "--max-batch", "64"]),
            results=("repo/manifest.json",),
        ),
        Stage(
            "parity",
            90,
            [*d3qe, "fidelity", "--repo", repo, "--device", device, "--out", str(f("parity"))]
            + (
                ["--torch", "fp32", "bf16", "--limit", "4", "--batch-size", "4"]
                if smoke
                else ["--torch", "fp32", "tf32", "bf16", "fp16", "--limit", "64", "--batch-size", "16"]
            ),
            needs=("export",),
            results=("fidelity.json",),
            markdown=("fidelity.md",),
            plot="fidelity.png",
        ),
        Stage(
            "throughput-inprocess",
            90,
            [*bench, "--no-server", "--out", str(f("throughput-inprocess"))],
            needs=("export",),
            **bench_files,
        ),
        Stage(
            "throughput-server",
            180,
            [*bench, "--model", IMAGE_ENTRANCE, RGB_ENTRANCE, "--out", str(f("throughput-server")), "--concurrency"]
            + (["1", "4"] if smoke else ["1", "16", "64", "256"]),
            needs=("export",),
            numpy1=not smoke,
            **bench_files,
        ),
        Stage(
            "throughput-compiled",
            150,
            None if smoke else [*bench, "--no-server", "--compile", "--out", str(f("throughput-compiled"))],
            "torch.compile with CUDA graphs is measured on CUDA only (Inductor takes minutes on this CPU)",
            needs=("export",),
            **bench_files,
        ),
    ]


def stage_environment(ctx: Context, stage: Stage) -> dict[str, str]:
    """The tree, the carry's site folder where installed, and numpy 1.26 first for a stage that starts Triton."""
    paths = [str(REPO)]
    if ctx.site.is_dir():
        paths.append(str(ctx.site))
    if stage.numpy1 and ctx.numpy1.is_dir():
        paths.insert(0, str(ctx.numpy1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")  # progress bars: a line every 5 s in the log
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


class GpuMemory:
    """The most GPU memory in use (nvidia-smi, MiB) while a stage runs, sampled every `period` seconds."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def used_mib() -> int | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        values = [int(v) for v in out.split() if v.isdigit()]
        return sum(values) if values else None

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = self.used_mib()
            if used is not None:
                self.peak = max(self.peak or 0, used)
            self._stop.wait(self.period)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_command(argv: list[str], env: dict[str, str], timeout: float, log: IO[str]) -> tuple[int | None, str]:
    """Run `argv` in the tree in its own process group, each output line to `log` and stdout; after `timeout` s
    the group is stopped (SIGTERM, then SIGKILL). Returns the exit code (None: stopped) and its last lines."""
    process = SupervisedProcess(argv, env=env, cwd=REPO, sinks=[log, sys.stdout], tail_lines=TAIL_LINES).start()
    rc = process.wait(timeout)
    if rc is None:
        process.stop(STOP_GRACE_S, group=True)
    return rc, "".join(process.tail)


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
    """The stage's results files, markdown and plot into the record and --out (what exists: a failed stage's too)."""
    folder = ctx.folder(stage.name)
    for pattern in stage.results:
        for path in sorted(folder.glob(pattern)):
            try:
                record.setdefault("results", {})[path.relative_to(folder).as_posix()] = read_result(path)
            except (ValueError, ET.ParseError) as e:
                record.setdefault("results", {})[path.name] = {"unreadable": str(e)}
    for pattern in stage.markdown:
        for path in sorted(folder.glob(pattern)):
            record.setdefault("markdown", {})[path.name] = path.read_text()
    if stage.plot and (plots := sorted(folder.glob(stage.plot))):
        shutil.copyfile(plots[0], ctx.out / f"{stage.name}.png")
        record["plot"] = f"{stage.name}.png"


def write_results(ctx: Context) -> None:
    tmp = ctx.out / ".results.json.tmp"
    tmp.write_text(json.dumps(ctx.results, indent=1, default=str) + "\n")
    tmp.replace(ctx.out / "results.json")


def run_stages(ctx: Context, plan: list[Stage], budget: float, fail: set[str]) -> dict:
    """Every stage of `plan` in turn within `budget` seconds; results.json and log.txt kept current. Returns results."""
    start = time.monotonic()
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.results = {
        "run": {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget,
            "work": str(ctx.work),
            "carry": str(ctx.carry),
            "stages": [s.name for s in plan],
            "complete": False,
        },
        "stages": {},
    }
    write_results(ctx)
    with (ctx.out / "log.txt").open("a") as log:
        for i, stage in enumerate(plan, 1):
            left = budget - (time.monotonic() - start)
            record: dict = {"budget_s": stage.budget_s}
            ctx.results["stages"][stage.name] = record
            failed_needs = [n for n in stage.needs if ctx.results["stages"].get(n, {}).get("status") != "ok"]
            if stage.argv is None:
                record |= {"status": "skipped", "reason": stage.why}
            elif failed_needs:
                record |= {"status": "skipped", "reason": f"needs {', '.join(failed_needs)}, which did not succeed"}
            elif left < MIN_STAGE_S:
                record |= {"status": "skipped", "reason": f"out of time: {left:.0f} s of the {budget:.0f} s left"}
            else:
                injected = [ctx.python, "-c", f"import sys; sys.exit({INJECTED!r})"]
                argv = stage.argv if stage.name not in fail else injected
                timeout = min(stage.budget_s, left)
                shutil.rmtree(ctx.folder(stage.name), ignore_errors=True)  # nothing of an earlier run is collected
                ctx.folder(stage.name).mkdir(parents=True)
                header = f"\n=== [{i}/{len(plan)}] {stage.name} (at most {timeout:.0f} s): {' '.join(argv)}\n"
                log.write(header)
                log.flush()
                print(header, end="", flush=True)
                t0 = time.monotonic()
                with GpuMemory() as memory:
                    rc, tail = run_command(argv, stage_environment(ctx, stage), timeout, log)
                status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
                record |= {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "command": argv}
                record["gpu_memory_peak_mib"] = memory.peak
                if status != "ok":
                    record["log_tail"] = tail
                collect(ctx, stage, record)
            line = f"=== {stage.name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "")
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
            write_results(ctx)
    ctx.results["run"] |= {"complete": True, "seconds": round(time.monotonic() - start, 1)}
    write_results(ctx)
    return ctx.results


def _probe(fn):
    """`fn()`, or the error it raised: one failing check must not hide the others."""
    try:
        return fn()
    except Exception as e:  # any failure is itself the finding
        return {"error": f"{type(e).__name__}: {e}"}


def _sh(*argv: str, env: dict | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    return (done.stdout + done.stderr).strip()


def preflight(ctx: Context) -> dict:
    """What the later stages rely on: GPU, versions, libpython for the stub, /dev/shm, the carry, numpy < 2's path."""
    import sysconfig

    from d3qe_serve.serving.host import machine, tool_versions

    def torch_info() -> dict:
        import torch

        info = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {"device": props.name, "capability": list(torch.cuda.get_device_capability(0))}
            info |= {"memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
        return info

    def libpython() -> dict:
        name = f"libpython{PYTHON}.so.1.0"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        return {
            "needed_by_stub": name,
            "ldconfig": [ln.strip() for ln in _sh("ldconfig", "-p").splitlines() if "libpython3" in ln],
            "py_enable_shared": sysconfig.get_config_var("Py_ENABLE_SHARED"),
            "libdir": libdir,
            "in_libdir": (Path(libdir) / name).is_file(),
        }

    def shm() -> dict:
        usage = shutil.disk_usage("/dev/shm")
        return {"total_gib": round(usage.total / 2**30, 1), "free_gib": round(usage.free / 2**30, 1)}

    def server_links() -> dict:
        """Libraries the carried server and stub cannot find (`ldd` … not found): none, or the server fails."""
        root = ctx.site / "pytriton" / "tritonserver"
        env = dict(os.environ, LD_LIBRARY_PATH=str(ctx.site / "nvidia_pytriton.libs"))
        found = {}
        for rel in (SERVER_FILES[0], SERVER_FILES[-1]):
            path = ctx.site / rel
            lines = _sh("ldd", str(path), env=env).splitlines() if path.is_file() else ["not installed"]
            found[rel.removeprefix("pytriton/tritonserver/")] = [ln.strip() for ln in lines if "not" in ln]
        return {"root": str(root), "missing": found}

    def numpy1_imports() -> dict:
        """The imports of the stage that starts Triton, under its path (numpy 1.26 first)."""
        env = stage_environment(ctx, Stage("probe", 0, None, numpy1=True))
        code = (
            "import json, numpy, torch, PIL, matplotlib.pyplot, tritonclient.grpc, ml_dtypes, open_clip; "
            "print(json.dumps({'numpy': numpy.__version__, 'torch': torch.__version__, 'ml_dtypes': "
            "ml_dtypes.__version__, 'matplotlib': matplotlib.__version__}))"
        )
        done = subprocess.run([ctx.python, "-c", code], env=env, capture_output=True, text=True, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-2000:]}

    installed = ctx.folder("install") / "installed.json"
    return {
        "nvidia_smi": _probe(
            lambda: _sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv")
        ),
        "python": {"version": sys.version, "executable": sys.executable},
        "torch": _probe(torch_info),
        "versions": _probe(tool_versions),
        "machine": _probe(machine),
        "libpython": _probe(libpython),
        "dev_shm": _probe(shm),
        "tmp_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1),
        "git": shutil.which("git"),
        "carry": json.loads(installed.read_text())["manifest"] if installed.is_file() else None,
        "server_links": _probe(server_links) if ctx.site.is_dir() else None,
        "numpy1_imports": _probe(numpy1_imports),
    }


def gpu_run(ctx: Context, *, smoke: bool = False, budget: float | None = None, fail: Iterable[str] = ()) -> dict:
    """The run's stages (`smoke`: on this CPU at tiny sizes) within `budget` seconds (default `BUDGET_S`, smoke
    `SMOKE_BUDGET_S`); the stages named in `fail` fail on purpose (InputError for a name that is no stage).
    Returns the results, also in `ctx.out`/results.json."""
    plan = stages(ctx, smoke)
    unknown = set(fail) - {s.name for s in plan}
    if unknown:
        raise InputError(f"--fail: no stage {sorted(unknown)}; the stages are {[s.name for s in plan]}")
    return run_stages(ctx, plan, budget or (SMOKE_BUDGET_S if smoke else BUDGET_S), set(fail))


def write_preflight(ctx: Context, path: Path) -> None:
    """The preflight stage itself: `preflight`'s findings as JSON at `path`."""
    path.write_text(json.dumps(preflight(ctx), indent=1, default=str) + "\n")
