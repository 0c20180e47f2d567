"""The carry for the GPU machine: what its image lacks, from PyPI, repacked small enough to travel beside the tree.

    d3qe gpu-carry build [--out build/gpu-carry] [--python 3.12]   (here, with the network: `make gpu-carry`)
    d3qe gpu-carry unpack CARRY DEST                               (there, offline: the GPU run's install stage)

The machine (no network, Python 3.12, its own torch and numpy 2) lacks open_clip_torch, tritonclient, the
Triton server and their dependencies (`WHEELS`); the server's python backend needs numpy < 2. `build` writes:

- `wheels/`: the `WHEELS` as downloaded (cp312 manylinux), for `pip install --no-index --target`: the
  client's transport (`CLIENT_WHEELS`: grpcio, protobuf, ml_dtypes) into a folder of its own, put on the path
  only where a stage talks to Triton, so that the image's own `import onnx` keeps the image's protobuf;
- `numpy1.tar.xz`: numpy 1.26.4 without its tests, put first on the path where a server runs;
- `tritonserver.tar.xz`: of the nvidia-pytriton wheel only what a server with the python backend needs (the
  binary, the python backend, the 3.12 stub, the libraries it bundles except its own libpython 3.13), laid
  out as in the wheel so that `serving.install.find_tritonserver` finds it once DEST/site is on the path;
- `manifest.json`: each file's size and sha256, what it came from, the tarballs' member lists.

Tarballs are deterministic (sorted members, fixed times and owners). `build` fails when the tree that travels
(`tree_bytes`) plus the carry exceeds `LIMIT_MIB` (`CarryError`): one device run takes 64 MiB in all.
`--python` builds the same carry for another interpreter: the GPU run's rehearsal (`make gpu-rehearsal`) uses
one for the Python this machine has, no 3.12 being installable here.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from d3qe_serve.errors import CarryError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CARRY = REPO / "build" / "gpu-carry"
PYTHON = "3.12"  # the GPU machine's
PLATFORMS = (
    "manylinux_2_35_x86_64",  # nvidia-pytriton's tag; the machine's glibc is newer
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
# The versions this checkout's venv runs. tritonclient 2.73's generated code needs grpcio >= 1.81.1 and
# protobuf >= 6.33.5, and it imports ml_dtypes (<= 0.5.4, which also loads under numpy 1.26): those three are
# `CLIENT_WHEELS`, installed apart.
WHEELS = (
    "open_clip_torch==3.3.0",
    "ftfy==6.3.1",
    "wcwidth==0.9.4",
    "tritonclient==2.73.0",
    "python-rapidjson==1.25",
    "grpcio==1.85.1",
    "protobuf==6.33.6",
    "ml_dtypes==0.5.4",
)
CLIENT_WHEELS = ("grpcio==1.85.1", "protobuf==6.33.6", "ml_dtypes==0.5.4")
NUMPY = "numpy==1.26.4"
PYTRITON = "nvidia-pytriton==0.7.0"


def stub_files(python: str = PYTHON) -> tuple[str, ...]:
    """The server files a python backend for `python` needs, in the nvidia-pytriton wheel's layout."""
    return (
        "pytriton/tritonserver/bin/tritonserver",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
        f"pytriton/tritonserver/python_backend_stubs/{python}/triton_python_backend_stub",
    )


SERVER_FILES = stub_files()
SERVER_LIBS = "nvidia_pytriton.libs"
EXECUTABLES = ("bin/tritonserver", "triton_python_backend_stub")
# Triton's python backend stub embeds Python with the launching interpreter's prefix and site-packages but not
# PYTHONPATH (seen with pyenv's 3.12 and a venv: numpy 2 from site-packages, the carried numpy 1.26 ignored, every
# input then empty). This .pth, in that interpreter's site-packages, puts PYTHONPATH's entries first where they
# are missing: in the stubs; elsewhere they are already on sys.path and it does nothing.
PATH_HOOK = "d3qe_stub_pythonpath.pth"
PATH_HOOK_LINE = (
    "import os, sys; sys.path[:0] = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) "
    "if p and p not in sys.path]\n"
)
LIMIT_MIB = 60  # of the 64 MiB a run carries: the rest is margin for the tree growing
XZ_PRESET = 6


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip(command: str, *args: str, python: str = PYTHON) -> None:
    """pip `command` for `python` (default the GPU machine's) and its platform, whatever this interpreter's,
    without dependencies."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms]
    quiet = ["--quiet", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([sys.executable, "-m", "pip", command, *quiet, *target, *args], check=True)


def download(requirements: Sequence[str], dest: Path, python: str = PYTHON) -> dict[str, Path]:
    """Each `name==version` as a cp312 (`python`) manylinux x86_64 (or pure) wheel in `dest`, from the index pip
    uses (its cache too); returns requirement → wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip("download", "--dest", str(dest), *requirements, python=python)
    found = {}
    for req in requirements:
        name, _, version = req.partition("==")
        wheels = sorted(dest.glob(f"{_dist_name(name)}-{version}-*.whl"), key=lambda p: p.name)
        if len(wheels) != 1:
            raise RuntimeError(f"{req}: expected one wheel in {dest}, found {[w.name for w in wheels]}")
        found[req] = wheels[0]
    return found


def server_files(root: Path, python: str = PYTHON) -> list[str]:
    """What a tritonserver with the python backend for `python` needs, relative to `root` (an unpacked
    nvidia-pytriton wheel, or the site-packages it is installed in): `stub_files` and every bundled library but
    libpython."""
    needed = stub_files(python)
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: not an nvidia-pytriton 0.7 tree")
    libs = [f"{SERVER_LIBS}/{p.name}" for p in (root / SERVER_LIBS).iterdir() if not p.name.startswith("libpython")]
    return sorted([*needed, *libs])


def numpy_files(root: Path) -> list[str]:
    """An unpacked numpy wheel's files but its test suites (half its size, never imported)."""
    files = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(f for f in files if "/tests/" not in f and "__pycache__" not in f)


def pack(root: Path, names: Iterable[str], out: Path) -> None:
    """`names` (relative to `root`) as a reproducible tar.xz: sorted, times and owners zeroed, modes 0644 or 0755."""
    with (
        lzma.open(out, "wb", preset=XZ_PRESET) as xz,
        tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(names):
            info = tarfile.TarInfo(name)
            info.size = (root / name).stat().st_size
            info.mode = 0o755 if name.endswith(EXECUTABLES) else 0o644
            with (root / name).open("rb") as f:
                tar.addfile(info, f)


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what a device run sends besides the carry: tracked and untracked-not-ignored files, and shared/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    files = {repo / name.decode() for name in listed if name}
    if (repo / "shared").is_dir():
        files |= {p for p in (repo / "shared").rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def _item(out: Path, path: Path, source: str, source_sha256: str | None, members: list[str] | None = None) -> dict:
    item = {"file": path.relative_to(out).as_posix(), "bytes": path.stat().st_size, "sha256": sha256(path)}
    item |= {"from": source, "source_sha256": source_sha256}
    if members is not None:
        item["members"] = members
    return item


def build(out: Path = DEFAULT_CARRY, limit_mib: float = LIMIT_MIB, python: str = PYTHON) -> dict:
    """Download, repack and write the carry for `python` to `out` (emptied first) with its manifest; returns the
    manifest. Raises CarryError when tree + carry exceed `limit_mib`."""
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    items = []
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        work = Path(tmp)
        wheels = download([*WHEELS, NUMPY, PYTRITON], work / "downloads", python)
        for req in WHEELS:
            dest = out / "wheels" / wheels[req].name
            shutil.copyfile(wheels[req], dest)
            items.append(_item(out, dest, req, sha256(wheels[req])))
        for req, tarball, select in ((NUMPY, "numpy1.tar.xz", numpy_files), (PYTRITON, "tritonserver.tar.xz", None)):
            unpacked = work / tarball
            print(f"repacking {wheels[req].name} → {tarball} (xz, about a minute for the server)", flush=True)
            with zipfile.ZipFile(wheels[req]) as z:
                z.extractall(unpacked)
            members = select(unpacked) if select else server_files(unpacked, python)
            pack(unpacked, members, out / tarball)
            items.append(_item(out, out / tarball, req, sha256(wheels[req]), members))
    carry = sum(i["bytes"] for i in items)
    tree = tree_bytes()
    manifest = {
        "python": python,
        "platforms": list(PLATFORMS),
        "items": items,
        "carry_bytes": carry,
        "tree_bytes": tree,
        "total_bytes": carry + tree,
        "limit_bytes": int(limit_mib * 2**20),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for i in items:
        print(f"{i['bytes'] / 2**20:8.2f} MiB  {i['file']}  ({i['from']})")
    print(f"{carry / 2**20:8.2f} MiB  carry in {out}\n{tree / 2**20:8.2f} MiB  the tree that travels with it")
    print(f"{(carry + tree) / 2**20:8.2f} MiB  together, of {limit_mib:g} MiB allowed (a run takes 64 MiB)")
    if carry + tree > manifest["limit_bytes"]:
        raise CarryError(f"tree + carry = {(carry + tree) / 2**20:.1f} MiB exceeds {limit_mib:g} MiB")
    return manifest


def install_path_hook(site_packages: Path | None = None) -> Path:
    """Write `PATH_HOOK` into `site_packages` (default this interpreter's): the stubs then see PYTHONPATH (the
    tree, the carry) as the server's launcher does. Returns its path."""
    hook = Path(site_packages or sysconfig.get_paths()["purelib"]) / PATH_HOOK
    hook.write_text(PATH_HOOK_LINE)
    return hook


def unpack(carry: Path, dest: Path) -> dict:
    """Install the carry under `dest` offline: the wheels and the server into `dest/site` but `CLIENT_WHEELS` into
    `dest/client`, numpy 1.26 into `dest/numpy1`. Checks every file against the manifest first (CarryError where
    one differs). Returns the paths (also in dest/installed.json). The wheels are installed for the carry's Python
    (the manifest's) whatever runs this (a test unpacks on another)."""
    manifest = json.loads((carry / "manifest.json").read_text())
    for item in manifest["items"]:
        if sha256(carry / item["file"]) != item["sha256"]:
            raise CarryError(f"{item['file']} does not match its manifest's sha256")
    site, client, numpy1 = dest / "site", dest / "client", dest / "numpy1"
    for d in (site, client, numpy1):
        if d.exists():
            shutil.rmtree(d)
    python = manifest.get("python", PYTHON)
    transport = {f"wheels/{_dist_name(r.partition('==')[0])}-{r.partition('==')[2]}-" for r in CLIENT_WHEELS}
    for folder, wanted in ((site, False), (client, True)):
        wheels = [
            str(carry / i["file"])
            for i in manifest["items"]
            if i["file"].endswith(".whl") and any(i["file"].startswith(t) for t in transport) == wanted
        ]
        install = ["install", "--no-index", "--no-compile", "--no-cache-dir", "--target", str(folder), *wheels]
        _pip(*install, python=python)
    for tarball, into in (("tritonserver.tar.xz", site), ("numpy1.tar.xz", numpy1)):
        with tarfile.open(carry / tarball) as tar:
            tar.extractall(into, filter="data")
    installed = {"site": str(site), "client": str(client), "numpy1": str(numpy1), "manifest": manifest}
    (dest / "installed.json").write_text(json.dumps(installed, indent=1) + "\n")
    return installed
