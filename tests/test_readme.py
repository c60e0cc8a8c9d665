"""The README is a short front door, and the Python examples of it and of docs/ run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 400, f"the README has {len(lines)} lines: move reference material to docs/"
    for page in ("docs/user-guide.md", "docs/configuration.md", "docs/results.md"):
        assert f"]({page}" in README.read_text(), f"the README does not link {page}"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda page: page.name)
def test_docs_python_examples_run(page):
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL):
        exec(compile(block, str(page), "exec"), {})
