"""Every module of the package reads in one sitting: none is over 700 lines.

A module that grows past that has taken on a second job; split it by job along
the data flow (``docs/design.md``, "Modules") instead of letting it grow.
``cuda.py`` exports only the runtime it defines: the kernels' descriptors are
imported from the ``gpu_patching.kernels`` module beside their source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gpu_patching
from gpu_patching import cuda

PACKAGE_ROOT = Path(gpu_patching.__file__).parent
MAX_MODULE_LINES = 700


def test_no_module_of_the_package_is_over_700_lines() -> None:
    too_long = {
        str(path.relative_to(PACKAGE_ROOT)): n_lines
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if (n_lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_cuda_exports_only_names_it_defines_not_the_kernels_descriptors() -> None:
    tree = ast.parse((PACKAGE_ROOT / "cuda.py").read_text(encoding="utf-8"))
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    re_exported = sorted(set(cuda.__all__) - defined)
    assert not re_exported, f"cuda.py re-exports {re_exported}"
