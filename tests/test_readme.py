"""The README's Python examples run as written, each on its own.

A reader copies one block into a fresh interpreter, so every block runs in
its own process (no names left over from the blocks above it), from an empty
folder, and must print what it shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_alone_in_a_fresh_interpreter_and_prints_its_result(block, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example shows no result"


def test_the_readme_states_the_python_on_which_make_test_installs_the_reference():
    # `make test` installs CAREamics 0.3.5 (the reference); pip refuses it below
    # the Python that its metadata requires, so that is make test's minimum.
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        requires = metadata("careamics")["Requires-Python"]
    except PackageNotFoundError:
        pytest.skip("the reference implementation is not installed")
    needed = tuple(int(part) for part in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    stated = re.search(r"`make test` needs Python >= (\d+)\.(\d+)", README.read_text())
    assert stated, "the README does not say which Python `make test` needs"
    assert tuple(int(part) for part in stated.groups()) >= needed
