"""The documentation runs as written: every ```python block of README.md and docs/, the
mkdocs build in strict mode, and docs/architecture.md matches ARCHITECTURE.md."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Extras an example may import; where one is missing, its examples are skipped.
OPTIONAL = ("torch", "numpy", "ray")
BLOCKS = [
    pytest.param(code, id=f"{page.name}-{index}")
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs_as_written(code, tmp_path):
    for module in OPTIONAL:  # the core runs on other Pythons have no extras: such blocks run on .venv
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M) and importlib.util.find_spec(module) is None:
            pytest.skip(f"the example needs {module}, which is not installed here")
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_architecture_page_is_the_repository_file():
    assert (ROOT / "docs" / "architecture.md").read_text() == (ROOT / "ARCHITECTURE.md").read_text()


@pytest.mark.timeout(120)
def test_mkdocs_builds_strict(tmp_path):
    mkdocs = pathlib.Path(sys.executable).with_name("mkdocs")
    out = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
