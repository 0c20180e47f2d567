"""What `pip install d3qe-serve` installs: one import package, data it needs, ranges rather than pins."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("d3qe_serve-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def _dist_info(whl: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in whl.namelist() if n.endswith(f".dist-info/{name}")]
    return whl.read(path).decode()


def test_the_wheel_installs_one_import_package(wheel):
    assert _dist_info(wheel, "top_level.txt").split() == ["d3qe_serve"]
    outside = {n.split("/")[0] for n in wheel.namelist()} - {"d3qe_serve"}
    assert all(n.endswith(".dist-info") for n in outside), outside
    names = set(wheel.namelist())
    # Each tier's folder is a subpackage; the python-backend models and the demo's images are package data.
    for tier in ("d3qe", "export", "serving", "model_repository", "client", "bulk", "ui", "cli", "benchmarks"):
        assert f"d3qe_serve/{tier}/__init__.py" in names, tier
    assert {"d3qe_serve/model_repository/part.py", "d3qe_serve/ui/static/index.html"} <= names
    assert any(n.startswith("d3qe_serve/cli/samples/") for n in names)
    assert not [n for n in names if "/results/" in n], "benchmark results are not package data"
    assert "d3qe = d3qe_serve.cli.main:main" in _dist_info(wheel, "entry_points.txt")


def test_dependencies_are_ranges_and_numpy_below_2_only_for_the_server(wheel):
    requires = [Requirement(r) for r in Parser().parsestr(_dist_info(wheel, "METADATA")).get_all("Requires-Dist")]
    pinned = [str(r) for r in requires if any(s.operator in ("==", "===", "~=") for s in r.specifier)]
    assert not pinned, "exact pins belong in constraints.txt"
    numpy = {str(r.marker): r.specifier for r in requires if r.name == "numpy"}
    assert numpy["None"].contains("2.1") and not numpy['extra == "serve"'].contains("2.1"), numpy
    assert set(numpy) == {"None", 'extra == "serve"'}
    (torch,) = [r for r in requires if r.name == "torch"]
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.14.1")
