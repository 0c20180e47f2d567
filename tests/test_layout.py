"""The tiers import one way, and the commands that only talk to a server import no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from d3qe_serve.cli.main import ROOT

REPO = Path(__file__).resolve().parents[1]
# What each tier (a top-level folder, the subpackage `d3qe_serve.<tier>`) may import of the others; the root's
# own modules (`d3qe_serve.errors`, `d3qe_serve.contract`) are for every tier. `client.results` is the one client
# module shared below the client.
TIERS = ("d3qe", "export", "serving", "model_repository", "client", "bulk", "ui", "cli", "benchmarks")
ALLOWED = {
    "d3qe": set(),
    "client": set(),
    "serving": {"d3qe", "client.results"},
    "model_repository": {"d3qe", "serving"},
    "export": {"d3qe", "serving", "client.results"},
    "bulk": {"d3qe", "serving", "client"},
    "ui": {"client"},  # the page asks the server through the client: no second inference path
    "cli": set(TIERS),
    "benchmarks": set(TIERS) - {"cli"},
}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports by absolute name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if node.module == ROOT}
    return names


def _allowed(tier: str, name: str) -> bool:
    """`name` (a module under the root) is the tier itself, a root module, or what ALLOWED gives `tier`."""
    rest = name.removeprefix(ROOT + ".")
    top = rest.split(".")[0]
    if top not in TIERS:
        return True  # the root and its shared modules
    return top == tier or any(rest == a or rest.startswith(a + ".") or top == a for a in ALLOWED[tier])


@pytest.mark.parametrize("tier", sorted(ALLOWED))
def test_no_tier_imports_a_higher_one(tier):
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in (REPO / tier).rglob("*.py")
        for name in _imports(path)
        if name.startswith(ROOT + ".") and not _allowed(tier, name)
    }
    assert not wrong, sorted(wrong)


def test_everything_is_imported_through_the_one_root():
    """A tier imported by its folder's name (`import client`) would be a second copy of the module."""
    folders = [REPO / t for t in TIERS if (REPO / t).is_dir()] + [REPO / ROOT, REPO / "tests"]
    bare = {
        f"{path.relative_to(REPO)} imports {name}"
        for folder in folders
        for path in folder.rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in TIERS
    }
    assert not bare, sorted(bare)


def test_the_root_imports_no_tier():
    names = {n for path in (REPO / ROOT).glob("*.py") for n in _imports(path)}
    assert not {n for n in names if n.removeprefix(ROOT + ".").split(".")[0] in TIERS}


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('MODULES', *sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    return set(line.split()[1:])


def test_help_and_scoring_through_a_server_load_no_model_code():
    helped = _modules_after(
        "from d3qe_serve.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    scored = _modules_after(
        "from d3qe_serve.cli.main import main\n"
        "main(['score', '--url', '127.0.0.1:9', '--ready-timeout', '0', 'x.png'])\n"
        "import d3qe_serve.client.eval  # its perturbations decode with PIL alone"
    )
    for modules in (helped, scored):
        assert not {"torch", "d3qe_serve.d3qe", "open_clip", "onnxruntime", "d3qe_serve.export"} & modules
    assert "d3qe_serve.client.score" in scored and "d3qe_serve.client.score" not in helped


def test_a_command_missing_its_extra_names_the_extra():
    code = (
        "import sys\nsys.modules['starlette'] = None\n"
        "from d3qe_serve.cli.main import main\nsys.exit(main(['ui', '--help']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "d3qe ui: needs starlette, which is not installed here: pip install 'd3qe-serve[ui]'\n"
