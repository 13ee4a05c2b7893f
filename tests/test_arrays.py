"""Array kinds are told apart in ``gpu_patching.arrays`` and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import gpu_patching
from gpu_patching.arrays import as_array, namespace, require_array, to_host

PACKAGE_ROOT = Path(gpu_patching.__file__).parent
#: The protocol attributes that say what kind of array a value is.
PROTOCOLS = {"__cuda_array_interface__", "__dlpack__", "__dlpack_device__"}


def _sniffing(path: Path) -> list[str]:
    """Code (not docstrings) of a module that reads array protocols or compares to "cupy"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in PROTOCOLS:
            found.append(f"{path.name}:{node.lineno}: {node.value}")
        elif isinstance(node, ast.Attribute) and node.attr in PROTOCOLS:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Compare) and any(
            isinstance(side, ast.Constant) and side.value == "cupy"
            for side in [node.left, *node.comparators]
        ):
            found.append(f"{path.name}:{node.lineno}: == 'cupy'")
    return found


def test_only_the_arrays_module_reads_array_protocols() -> None:
    found = [
        line
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if path != PACKAGE_ROOT / "arrays.py"
        for line in _sniffing(path)
    ]
    assert found == []


def test_a_memmap_is_a_numpy_array_and_comes_to_the_host_as_its_values(tmp_path) -> None:
    mapped = np.memmap(tmp_path / "values.bin", dtype=np.int16, mode="w+", shape=(3, 4))
    mapped[:] = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert namespace(mapped, "stack") is np
    assert as_array(mapped, "stack") is mapped
    np.testing.assert_array_equal(to_host(mapped, np.int64), np.arange(12).reshape(3, 4))


def test_a_python_container_is_no_array_and_require_array_names_it() -> None:
    assert as_array([[1, 2]], "mask") is None
    with pytest.raises(TypeError, match=r"mask must be a NumPy or CuPy array .*got list"):
        require_array([[1, 2]], "mask")
    with pytest.raises(TypeError, match=r"stack must be a NumPy or CuPy array, got list"):
        namespace([[1, 2]], "stack")


def test_a_cpu_tensor_is_read_as_a_numpy_array() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    array = require_array(tensor, "stack")
    assert isinstance(array, np.ndarray)
    np.testing.assert_array_equal(array, np.arange(6).reshape(2, 3))


def _compares_package_name(path: Path, package: str) -> list[str]:
    """Code of a module that compares a value to a package's name (sniffing its type)."""
    return [
        f"{path.name}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Compare)
        and any(
            isinstance(side, ast.Constant) and side.value == package
            for side in [node.left, *node.comparators]
        )
    ]


def test_only_the_arrays_module_tells_zarr_arrays_apart() -> None:
    found = [
        line
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if path != PACKAGE_ROOT / "arrays.py"
        for line in _compares_package_name(path, "zarr")
    ]
    assert found == []


def test_a_zarr_array_is_told_apart_from_a_numpy_array_and_a_group() -> None:
    zarr = pytest.importorskip("zarr")
    from gpu_patching.arrays import is_zarr_array

    array = zarr.create_array(store={}, shape=(2, 3), chunks=(1, 3), dtype="uint8")
    assert is_zarr_array(array)
    assert not is_zarr_array(np.zeros((2, 3), np.uint8))
    assert not is_zarr_array(zarr.group(store={}))
