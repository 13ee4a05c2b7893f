"""Helpers for tests and benchmarks: loading the reference implementation.

The reference is CAREamics' ``StratifiedPatching`` (``careamics==0.3.5``).
Importing ``careamics`` pulls in PyTorch and much more, so we load only its
patching package, straight from the installed files, without running
``careamics/__init__.py``. Install it with
``pip install --no-deps careamics==0.3.5`` (``make test`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["REFERENCE_VERSION", "load_reference"]

#: The CAREamics release whose behaviour gpu-patching reproduces.
REFERENCE_VERSION = "0.3.5"
_ALIAS = "_gpu_patching_reference_patching"


def load_reference() -> Any:
    """Return CAREamics' ``StratifiedPatching`` class, loaded without its dependencies.

    Returns
    -------
    type
        The reference ``StratifiedPatching`` class.

    Raises
    ------
    ImportError
        If CAREamics is not installed, or is not the expected version.
    """
    if _ALIAS in sys.modules:
        return sys.modules[f"{_ALIAS}.stratified_patching"].StratifiedPatching
    spec = importlib.util.find_spec("careamics")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the reference needs careamics=={REFERENCE_VERSION}: "
            f"pip install --no-deps careamics=={REFERENCE_VERSION}"
        )
    from importlib.metadata import version

    found = version("careamics")
    if found != REFERENCE_VERSION:
        raise ImportError(f"careamics {found} is installed, expected {REFERENCE_VERSION}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset" / "patching"
    package = types.ModuleType(_ALIAS)
    package.__path__ = [str(folder)]
    sys.modules[_ALIAS] = package
    try:
        module = importlib.import_module(f"{_ALIAS}.stratified_patching")
    except Exception:
        del sys.modules[_ALIAS]
        raise
    return module.StratifiedPatching
