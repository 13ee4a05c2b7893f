"""A module's underscore names are its own: no other module of the package reads them.

The rule (docs/design.md, "Module map"): modules named with a leading
underscore (``_validation``, ``_state``, ...) are internal to the package and
any module of it may import them and their public names; a name with a leading
underscore, in any module, is private to the module that defines it. These
tests parse every source file of ``gpu_patching`` with :mod:`ast`, so the rule
holds for code that no test happens to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gpu_patching

PACKAGE_ROOT = Path(gpu_patching.__file__).parent
PACKAGE = "gpu_patching"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    # A package's own __init__ is level 1 of itself; a module's is its parent.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def _is_module(name: str) -> bool:
    path = PACKAGE_ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private_imports(text: str, module: str, is_package: bool, label: str) -> list[str]:
    """Underscore names imported from, or read as attributes of, other package modules."""
    tree = ast.parse(text, filename=label)
    found: list[str] = []
    # Names bound to package modules in this file (``from . import rng``,
    # ``import gpu_patching.grid as grid``), whose attributes are checked.
    module_aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                imported = f"{source}.{alias.name}"
                if _is_module(imported):
                    # A module: underscore modules are the package's internals.
                    module_aliases[alias.asname or alias.name] = imported
                elif _is_private(alias.name) and source != module:
                    found.append(f"{label}:{node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    if alias.asname:
                        module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and module_aliases[node.value.id] != module
            and _is_private(node.attr)
        ):
            target = module_aliases[node.value.id]
            found.append(f"{label}:{node.lineno}: {node.value.id}.{node.attr} ({target})")
    return found


def test_no_module_imports_another_modules_underscore_names() -> None:
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        label = str(path.relative_to(PACKAGE_ROOT.parent))
        found += _private_imports(text, _module_name(path), path.name == "__init__.py", label)
    assert found == []


def test_the_check_catches_underscore_imports_and_attributes_but_not_underscore_modules() -> None:
    # The check itself, on a module of gpu_patching.backends that breaks the
    # rule both ways and also imports an internal module (allowed).
    text = (
        "from ..rng import _private\n"
        "from .. import grid, _validation as check\n"
        "import gpu_patching.tables as tables\n"
        "value = grid._hidden + check.as_int(1, 'one') + tables._secret\n"
        "from .numpy_backend import _own_helper\n"
    )
    found = _private_imports(text, "gpu_patching.backends.probe", False, "probe.py")
    assert sorted(found) == [
        "probe.py:1: from gpu_patching.rng import _private",
        "probe.py:4: grid._hidden (gpu_patching.grid)",
        "probe.py:4: tables._secret (gpu_patching.tables)",
        "probe.py:5: from gpu_patching.backends.numpy_backend import _own_helper",
    ]
