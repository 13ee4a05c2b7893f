"""A test stuck inside a host-launched kernel ends at the per-test time limit.

The host launch (``tests/host_launch.py``) runs device code inside one ctypes
call. Python runs no signal handler until such a call returns, so
pytest-timeout's ``signal`` method never stops a kernel that loops for ever (a
grid stride of 0, a cycle walk that never ends): the suite would hang. The
project's pytest configuration must use the ``thread`` method, which ends the
run with the stuck test's stack.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from host_launch import cxx

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

SPIN_SOURCE = """
extern "C" void spin(volatile int* flag) {
    while (*flag == 0) {
    }
}
"""

STUCK_TEST = """
import ctypes


def test_stuck_in_c():
    library = ctypes.CDLL({library!r})
    flag = ctypes.c_int(0)
    library.spin(ctypes.byref(flag))
"""


def test_a_test_looping_for_ever_inside_a_ctypes_call_fails_at_the_configured_time_limit(
    tmp_path: Path,
) -> None:
    compiler = cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    library = tmp_path / "spin.so"
    source = tmp_path / "spin.cpp"
    source.write_text(SPIN_SOURCE)
    subprocess.run(
        [compiler, "-O0", "-shared", "-fPIC", str(source), "-o", str(library)], check=True
    )
    stuck = tmp_path / "test_stuck.py"
    stuck.write_text(STUCK_TEST.format(library=str(library)))
    # The project's own configuration, with only the limit shortened.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c"]
    command += [str(PYPROJECT), "--rootdir", str(tmp_path), "-o", "timeout=2", str(stuck)]
    try:
        # Generous: the child needs seconds; only a child that ignores its limit gets here.
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the per-test time limit did not stop a test stuck in a ctypes call")
    assert result.returncode != 0
    assert "Timeout" in result.stdout + result.stderr


def test_a_test_that_launches_the_host_kernels_has_a_short_time_limit(
    request: pytest.FixtureRequest, host_kernels: object
) -> None:
    # Such a test takes about a second; a kernel that never returns then ends
    # the run in minutes rather than at the suite's 600 s per test.
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and 0 < marker.args[0] <= 120
