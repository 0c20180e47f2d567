"""Finding a tritonserver installation, and preparing what it needs to run python-backend models here.

The server binary comes from the `nvidia-pytriton` wheel (or a `tritonserver` on PATH). The wheel ships
its Python backend without a stub in the backend folder: the stub for this Python is copied beside it.
The stub embeds libpython and finds its prefix through the `python3` on PATH, so the server is launched
with this interpreter's bin folder first on PATH: python-backend models then import this environment's
packages (`d3qe_serve`, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from d3qe_serve.errors import ServerError


@dataclass(frozen=True)
class ServerInstall:
    """Where a tritonserver lives: its binary, the libraries it needs and its backends."""

    binary: Path
    library_dirs: tuple[Path, ...]
    backends: Path  # holds python/libtriton_python.so
    stubs: Path | None  # python_backend_stubs/<major.minor>/ (the pytriton wheel); None: the stub is in backends/python


def _install_of(binary: Path) -> ServerInstall:
    root = binary.resolve().parents[1]
    if (root / "python_backend_stubs").is_dir():  # the nvidia-pytriton wheel: <site>/pytriton/tritonserver/bin
        return ServerInstall(
            binary, (root.parents[1] / "nvidia_pytriton.libs",), root / "backends", root / "python_backend_stubs"
        )
    return ServerInstall(binary, (root / "lib",), root / "backends", None)  # NVIDIA's container: /opt/tritonserver


def find_tritonserver(binary: str | Path | None = None) -> ServerInstall:
    """`binary` if given; else the nvidia-pytriton wheel's server if installed, else a `tritonserver` on PATH."""
    if binary is not None:
        binary = Path(binary)
        if not binary.is_file() or not os.access(binary, os.X_OK):
            why = "not an executable file" if binary.exists() else "no such file"
            raise ServerError(f"no tritonserver at {binary}: {why}")
        return _install_of(binary)
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        wheel_binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
        if wheel_binary.is_file():
            return _install_of(wheel_binary)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _install_of(Path(on_path))
    raise ServerError(
        "no tritonserver found: install the nvidia-pytriton wheel (pip install nvidia-pytriton==0.7.0, "
        "it bundles the server) or put a tritonserver binary on PATH"
    )


def prepare_backend_directory(install: ServerInstall, dest: Path) -> Path:
    """A `--backend-directory` whose python backend has the stub for this Python; returns it."""
    backend = install.backends / "python"
    if not (backend / "libtriton_python.so").is_file():
        raise ServerError(f"{backend} has no libtriton_python.so: this tritonserver has no Python backend")
    if install.stubs is None:
        if not (backend / "triton_python_backend_stub").is_file():
            raise ServerError(f"{backend} has no triton_python_backend_stub")
        return install.backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in install.stubs.iterdir() if p.is_dir())
        raise ServerError(f"no Python backend stub for Python {version} in {install.stubs} (has {available})")
    out = dest / "python"
    out.mkdir(parents=True, exist_ok=True)
    for src in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
        shutil.copy2(src, out / src.name)
    return dest


def server_environment(install: ServerInstall) -> dict[str, str]:
    """This process's environment with the server's libraries and this interpreter's bin folder first."""
    env = os.environ.copy()
    libs = [str(p) for p in install.library_dirs]
    # The stub links libpython3.X; the launching interpreter's own copy keeps its C extensions loadable.
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
