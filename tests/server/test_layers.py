"""The layers hold: the root modules import only downward (import-linter checks the packages, see pyproject.toml),
and a server fronting an upstream never loads torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"api", "backends", "generation", "models", "engine", "server", "sse"}


def our_imports(module: str) -> set[str]:
    """The project's modules and packages a root module imports, at any depth of its code."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PACKAGES


def test_root_modules_import_downward() -> None:
    assert our_imports("sse") == set()  # the SSE writer is aiohttp and bytes only
    assert our_imports("engine") <= {"generation", "models"}  # the engine never knows which door or backend
    assert "engine" in our_imports("server")  # sanity: the check sees imports inside functions too


def test_upstream_mode_imports_no_torch() -> None:
    """`--upstream` starts the real command line; Python's import log shows every module it loaded by then."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "server.py", "--upstream", "http://127.0.0.1:9/v1", "--port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "ready; serving on" in line:
                break
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # and closes the pipe
    assert any("ready; serving on" in line for line in lines), "".join(lines[-20:])
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "aiohttp.web" in imported  # sanity: the import log is read
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
