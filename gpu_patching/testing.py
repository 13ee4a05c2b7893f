"""Helpers for tests and benchmarks: the reference implementation, the machine.

The reference is CAREamics' ``StratifiedPatching`` (``careamics==0.3.5``).
Importing ``careamics`` pulls in PyTorch and much more, so we load only its
patching package, straight from the installed files, without running
``careamics/__init__.py``. Install it with
``pip install --no-deps careamics==0.3.5`` (``make test`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["REFERENCE_VERSION", "cpu_model", "import_careamics", "load_reference", "usable_cupy"]

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


def import_careamics() -> Any:
    """Return the whole ``careamics`` package (with its dependencies), for the CAREamics tier.

    CAREamics imports torchvision, whose only wheels on PyPI for Linux are
    CUDA builds: beside a CPU build of PyTorch their compiled operators cannot
    load, and ``import torchvision`` then stops on the fake kernels it
    registers for ``torchvision::nms`` and ``torchvision::qnms``, which need
    those operators declared. CAREamics' data pipeline calls no torchvision
    operator, so in that case (and only then) this declares the two operator
    schemas, without any kernel, and imports again. A torchvision whose
    operators load is left alone.

    Returns
    -------
    module
        The ``careamics`` package.

    Raises
    ------
    ImportError
        If CAREamics or one of its dependencies is missing.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        import torch

        library = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        # Keep the declarations for the life of the process.
        globals()["_TORCHVISION_SCHEMAS"] = library
        import torchvision  # noqa: F401
    return importlib.import_module("careamics")


def usable_cupy() -> tuple[Any, str]:
    """Return ``(cupy, "")`` when a CUDA device runs a kernel, else ``(None, why)``.

    Returns
    -------
    tuple
        The ``cupy`` module (or None) and, when None, the reason in words:
        CuPy missing or broken, no device visible, or a device that cannot
        run a kernel (for instance no driver).
    """
    try:
        import cupy
    except Exception as error:  # not installed, or a broken CUDA install
        return None, f"CuPy is not importable ({type(error).__name__}: {error})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy is installed but no CUDA device is visible"
        cupy.arange(4).sum().item()  # a usable device runs a kernel
    except Exception as error:
        return None, f"no usable CUDA device ({type(error).__name__}: {error})"
    return cupy, ""


def cpu_model() -> str:
    """Return the CPU's model name and logical core count, for benchmark headers."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"
