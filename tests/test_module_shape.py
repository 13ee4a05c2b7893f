"""Every module of the package reads in one sitting: none is over 700 lines.

A module that grows past that has taken on a second job; split it by job along
the data flow (``docs/design.md``, "Modules") instead of letting it grow.
"""

from __future__ import annotations

from pathlib import Path

import gpu_patching

PACKAGE_ROOT = Path(gpu_patching.__file__).parent
MAX_MODULE_LINES = 700


def test_no_module_of_the_package_is_over_700_lines() -> None:
    too_long = {
        str(path.relative_to(PACKAGE_ROOT)): n_lines
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if (n_lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
