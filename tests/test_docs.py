"""The README and the manuals in docs/ checked against the code, so that they cannot drift from it.

Every `d3qe COMMAND --option …` they write (in code blocks and in inline code) names a command of the `d3qe`
dispatcher whose `--help` lists each of those options; every relative link points at a file of the repository;
every `d3qe_serve.…` name they import or cite resolves; and the README stays within 10 KB.
"""

from __future__ import annotations

import functools
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from d3qe_serve.cli.main import COMMANDS, MAINTAINERS

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 10 * 1024

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code, at most over one line break
# A shell command ends at a comment, a pipe, `;`, `&&` or `&` (each standing alone).
SHELL_BREAK = re.compile(r"\s(?:#|&&|\|\||\||;|&)(?=\s|$)")
INVOCATION = re.compile(r"(?:^|[\s/(\"'])d3qe\s+([a-z][a-z0-9-]*)(?=\s|$)(.*)$")
OPTION = re.compile(r"(?<![\w-])--([a-z0-9][a-z0-9-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOTTED = re.compile(r"\bd3qe_serve(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(
    r"^[ \t]*from[ \t]+(d3qe_serve[\w.]*)[ \t]+import[ \t]+(?:\(([^)]*)\)|([\w \t,]+))", re.MULTILINE
)


@dataclass(frozen=True)
class Invocation:
    doc: str  # the file, relative to the repository
    command: str
    options: tuple[str, ...]
    text: str


def _code(doc: Path) -> tuple[list[str], list[str]]:
    """The doc's code-block lines (backslash continuations joined) and its inline code spans (outside blocks)."""
    text = doc.read_text()
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    spans = [s.replace("\n", " ") for s in INLINE.findall(FENCE.sub("", text))]
    return lines, spans


def _invocations(doc: Path) -> list[Invocation]:
    lines, spans = _code(doc)
    found = []
    for snippet in lines + spans:
        for command_line in SHELL_BREAK.split(snippet):
            m = INVOCATION.search(command_line)
            if m:
                options = tuple(f"--{o}" for o in OPTION.findall(m.group(2)))
                found.append(Invocation(str(doc.relative_to(REPO)), m.group(1), options, command_line.strip()))
    return found


INVOCATIONS = [i for doc in DOCS for i in _invocations(doc)]


@functools.cache
def _help(command: str) -> subprocess.CompletedProcess:
    """`d3qe COMMAND --help`, run once per command."""
    return subprocess.run(
        [sys.executable, "-m", "d3qe_serve.cli.main", command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_docs_name_commands():
    """The parser above finds what the docs hold (a guard against it silently finding nothing)."""
    named = {i.command for i in INVOCATIONS if i.doc == "README.md"}
    assert {"demo", "export", "serve", "score"} <= named, named


def test_every_command_named_exists():
    unknown = sorted({f"{i.doc}: d3qe {i.command} ({i.text})" for i in INVOCATIONS if i.command not in COMMANDS})
    assert not unknown, unknown


def test_every_command_is_documented():
    """Each user command has an example in the README; the maintainers' ones at least one in docs/."""
    in_readme = {i.command for i in INVOCATIONS if i.doc == "README.md"}
    anywhere = {i.command for i in INVOCATIONS}
    missing = [name for name, c in COMMANDS.items() if name not in in_readme and not c.help.startswith(MAINTAINERS)]
    missing += [name for name in COMMANDS if name not in anywhere]
    assert not missing, f"d3qe commands without an example: {sorted(set(missing))}"


@pytest.mark.parametrize("command", sorted({i.command for i in INVOCATIONS} & set(COMMANDS)))
def test_documented_options_exist(command):
    """`d3qe COMMAND --help` works and lists every option the docs write with that command."""
    result = _help(command)
    assert result.returncode == 0, f"d3qe {command} --help failed:\n{result.stderr[-3000:]}"
    wrong = sorted(
        {
            f"{i.doc}: {option} in `{i.text}`"
            for i in INVOCATIONS
            if i.command == command
            for option in i.options
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout)
        }
    )
    assert not wrong, f"options d3qe {command} --help does not list: {wrong}"


def test_readme_fits_on_a_screen():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}: move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_relative_links_point_at_files(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in this file
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or not path.is_relative_to(REPO):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)} links to missing files: {broken}"


def _resolves(name: str) -> bool:
    """`name` is a module of ours, or an attribute (chain) of the longest such module it starts with."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise  # a module of ours that fails on a missing dependency: not a doc error
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _python_names(doc: Path) -> set[str]:
    """The `d3qe_serve` names a doc imports in its code blocks or cites in code."""
    lines, spans = _code(doc)
    code = "\n".join(lines)
    names = {
        f"{module}.{name.strip()}"
        for module, wrapped, imported in FROM_IMPORT.findall(code)
        for name in (wrapped or imported).split(",")
        if name.strip()
    }
    return names | {n for snippet in [*lines, *spans] for n in DOTTED.findall(snippet)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_python_names_resolve(doc):
    unresolved = sorted(n for n in _python_names(doc) if not _resolves(n))
    assert not unresolved, f"{doc.relative_to(REPO)} names what d3qe_serve does not hold: {unresolved}"
