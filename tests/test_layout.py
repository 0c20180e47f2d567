"""The tiers import one way, and the commands that only talk to a server import no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import OURS

ROOT = Path(__file__).resolve().parents[1]
# What each tier may import of ours (besides itself); `client.results` is the one client module shared.
ALLOWED = {
    "d3qe": set(),
    "client": set(),
    "serving": {"d3qe", "client.results"},
    "model_repository": {"d3qe", "serving"},
    "export": {"d3qe", "serving", "client.results"},
    "ui": {"client"},  # the page asks the server through the client: no second inference path
    "cli": OURS,
    "benchmarks": OURS,
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in OURS}


def _allowed(tier: str, name: str) -> bool:
    top = name.split(".")[0]
    return top == tier or any(name == a or name.startswith(a + ".") or top == a for a in ALLOWED[tier])


@pytest.mark.parametrize("tier", sorted(ALLOWED))
def test_no_tier_imports_a_higher_one(tier):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / tier).rglob("*.py")
        for name in _imports(path)
        if not _allowed(tier, name)
    }
    assert not wrong, sorted(wrong)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('MODULES', *sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    return set(line.split()[1:])


def test_help_and_scoring_through_a_server_load_no_model_code():
    helped = _modules_after("from cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    scored = _modules_after(
        "from cli.main import main\nmain(['score', '--url', '127.0.0.1:9', '--ready-timeout', '0', 'x.png'])\n"
        "import client.eval  # its perturbations decode with PIL alone"
    )
    for modules in (helped, scored):
        assert not {"torch", "d3qe", "open_clip", "onnxruntime", "export"} & modules
    assert "client.score" in scored and "client.score" not in helped


def test_a_command_missing_its_extra_names_the_extra():
    code = "import sys\nsys.modules['starlette'] = None\nfrom cli.main import main\nsys.exit(main(['ui', '--help']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "d3qe ui: needs starlette, which is not installed here: pip install 'd3qe-serve[ui]'\n"
