"""The carry for the GPU machine: what its image lacks, from PyPI, repacked small enough to travel beside the tree.

    d3qe gpu-carry build [--out build/gpu-carry]     (here, with the network: `make gpu-carry`)
    d3qe gpu-carry unpack CARRY DEST                 (there, offline: the GPU run's install stage does it)

The machine (no network, Python 3.12, its own torch and numpy 2) lacks open_clip_torch, tritonclient, the
Triton server and their dependencies (`WHEELS`); the server's python backend needs numpy < 2. `build` writes:

- `wheels/`: the `WHEELS` as downloaded (cp312 manylinux), for `pip install --no-index --target`;
- `numpy1.tar.xz`: numpy 1.26.4 without its tests, put first on the path where a server runs;
- `tritonserver.tar.xz`: of the nvidia-pytriton wheel only what a server with the python backend needs (the
  binary, the python backend, the 3.12 stub, the libraries it bundles except its own libpython 3.13), laid
  out as in the wheel so that `serving.install.find_tritonserver` finds it once DEST/site is on the path;
- `manifest.json`: each file's size and sha256, what it came from, the tarballs' member lists.

Tarballs are deterministic (sorted members, fixed times and owners). `build` fails when the tree that travels
(`tree_bytes`) plus the carry exceeds `LIMIT_MIB` (`CarryError`): one device run takes 64 MiB in all.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
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
# protobuf >= 6.33.5, and it imports ml_dtypes (<= 0.5.4, which also loads under numpy 1.26).
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
NUMPY = "numpy==1.26.4"
PYTRITON = "nvidia-pytriton==0.7.0"
SERVER_FILES = (
    "pytriton/tritonserver/bin/tritonserver",
    "pytriton/tritonserver/backends/python/libtriton_python.so",
    "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
    f"pytriton/tritonserver/python_backend_stubs/{PYTHON}/triton_python_backend_stub",
)
SERVER_LIBS = "nvidia_pytriton.libs"
EXECUTABLES = ("bin/tritonserver", "triton_python_backend_stub")
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


def _pip(command: str, *args: str) -> None:
    """pip `command` for the GPU machine's Python and platform, whatever this interpreter's, without dependencies."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    target = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", *platforms]
    quiet = ["--quiet", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([sys.executable, "-m", "pip", command, *quiet, *target, *args], check=True)


def download(requirements: Sequence[str], dest: Path) -> dict[str, Path]:
    """Each `name==version` as a cp312 manylinux x86_64 (or pure) wheel in `dest`, from the index pip uses (its
    cache too); returns requirement → wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip("download", "--dest", str(dest), *requirements)
    found = {}
    for req in requirements:
        name, _, version = req.partition("==")
        wheels = sorted(dest.glob(f"{_dist_name(name)}-{version}-*.whl"), key=lambda p: p.name)
        if len(wheels) != 1:
            raise RuntimeError(f"{req}: expected one wheel in {dest}, found {[w.name for w in wheels]}")
        found[req] = wheels[0]
    return found


def server_files(root: Path) -> list[str]:
    """What a tritonserver with the python backend needs, relative to `root` (an unpacked nvidia-pytriton wheel,
    or the site-packages it is installed in): `SERVER_FILES` and every bundled library but libpython."""
    missing = [f for f in SERVER_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: not an nvidia-pytriton 0.7 tree")
    libs = [f"{SERVER_LIBS}/{p.name}" for p in (root / SERVER_LIBS).iterdir() if not p.name.startswith("libpython")]
    return sorted([*SERVER_FILES, *libs])


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


def build(out: Path = DEFAULT_CARRY, limit_mib: float = LIMIT_MIB) -> dict:
    """Download, repack and write the carry to `out` (emptied first) with its manifest; returns the manifest.
    Raises CarryError when tree + carry exceed `limit_mib`."""
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    items = []
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        work = Path(tmp)
        wheels = download([*WHEELS, NUMPY, PYTRITON], work / "downloads")
        for req in WHEELS:
            dest = out / "wheels" / wheels[req].name
            shutil.copyfile(wheels[req], dest)
            items.append(_item(out, dest, req, sha256(wheels[req])))
        for req, tarball, select in ((NUMPY, "numpy1.tar.xz", numpy_files), (PYTRITON, "tritonserver.tar.xz", None)):
            unpacked = work / tarball
            print(f"repacking {wheels[req].name} → {tarball} (xz, about a minute for the server)", flush=True)
            with zipfile.ZipFile(wheels[req]) as z:
                z.extractall(unpacked)
            members = (select or server_files)(unpacked)
            pack(unpacked, members, out / tarball)
            items.append(_item(out, out / tarball, req, sha256(wheels[req]), members))
    carry = sum(i["bytes"] for i in items)
    tree = tree_bytes()
    manifest = {
        "python": PYTHON,
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


def unpack(carry: Path, dest: Path) -> dict:
    """Install the carry under `dest` offline: the wheels and the server into `dest/site`, numpy 1.26 into
    `dest/numpy1`. Checks every file against the manifest first (CarryError where one differs). Returns the
    paths (also in dest/installed.json). The wheels are installed for the GPU machine's Python whatever runs
    this (a test unpacks on another)."""
    manifest = json.loads((carry / "manifest.json").read_text())
    for item in manifest["items"]:
        if sha256(carry / item["file"]) != item["sha256"]:
            raise CarryError(f"{item['file']} does not match its manifest's sha256")
    site, numpy1 = dest / "site", dest / "numpy1"
    for d in (site, numpy1):
        if d.exists():
            shutil.rmtree(d)
    wheels = [str(carry / i["file"]) for i in manifest["items"] if i["file"].endswith(".whl")]
    _pip("install", "--no-index", "--no-compile", "--no-cache-dir", "--target", str(site), *wheels)
    for tarball, into in (("tritonserver.tar.xz", site), ("numpy1.tar.xz", numpy1)):
        with tarfile.open(carry / tarball) as tar:
            tar.extractall(into, filter="data")
    installed = {"site": str(site), "numpy1": str(numpy1), "manifest": manifest}
    (dest / "installed.json").write_text(json.dumps(installed, indent=1) + "\n")
    return installed
