"""Both backends keep one contract: the same call gives the same result or the same error.

The CUDA backend runs here with NumPy as its array namespace and the shipped
kernel launched on the host (``tests/host_launch.py``), so its whole launch
path is the one a GPU takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from host_launch import HostBackend, HostKernels

from gpu_patching import StratifiedPatching
from gpu_patching.backends import Backend, NumpyBackend, resolve_backend
from gpu_patching.permutation import EpochOrder


@pytest.fixture(scope="module")
def sampler() -> StratifiedPatching:
    sampler = StratifiedPatching([(2, 1, 40, 30), (1, 1, 25, 25)], (5, 5), seed=11, backend="numpy")
    sampler.exclude_patches(0, 1, [(2, 2)])
    sampler.set_region_probs(1, 0, {(0, 0): 0.25})
    return sampler


def _backends(host_kernels: HostKernels) -> list[Any]:
    return [NumpyBackend(), HostBackend(host_kernels)]


def _outcome(backend: Any, sampler: StratifiedPatching, indices: Any) -> Any:
    try:
        result = backend.draw(sampler._tables, indices, 3, sampler.seed)
    except (IndexError, TypeError, ValueError) as error:
        return type(error), str(error)
    return tuple(np.asarray(column).tolist() for column in result)


def test_both_backends_are_backends(host_kernels: HostKernels) -> None:
    for backend in _backends(host_kernels):
        assert isinstance(backend, Backend)
        assert backend.name in ("numpy", "cuda")
    assert isinstance(resolve_backend("numpy"), Backend)


@pytest.mark.parametrize(
    "indices",
    [
        pytest.param("all", id="every index as an array"),
        pytest.param([0, 5, 5, 2], id="repeated indices"),
        pytest.param([], id="no index"),
        pytest.param([-1, 3], id="a negative index"),
        pytest.param([3, "n"], id="one past the end"),
        pytest.param([2**63 - 1], id="the largest int64"),
        pytest.param(np.array([2**64 - 1], dtype=np.uint64), id="the largest uint64"),
        pytest.param(np.array([0.0, 1.0]), id="float indices"),
        pytest.param(np.zeros((2, 2), dtype=np.int64), id="a 2-D array"),
        pytest.param(range(0, 10, 2), id="a range with step 2"),
        pytest.param(range(3, -1), id="a range past the end (stop: n + 1)"),
        pytest.param(range(-2, 4), id="a range from a negative index"),
        pytest.param(EpochOrder.contiguous(0, 10**9), id="an order past the end"),
        pytest.param(EpochOrder.shard(10, shuffle=True, rank=1, world_size=3), id="a shard"),
    ],
)
def test_the_same_call_gives_the_same_result_or_error_on_both_backends(
    host_kernels: HostKernels, sampler: StratifiedPatching, indices: Any
) -> None:
    n = sampler.n_patches
    if isinstance(indices, str):
        indices = np.arange(n)
    elif isinstance(indices, list):
        indices = np.array([n if v == "n" else v for v in indices], dtype=np.int64)
    elif isinstance(indices, range) and indices.stop == -1:
        indices = range(indices.start, n + 1)
    numpy_outcome, cuda_outcome = (
        _outcome(backend, sampler, indices) for backend in _backends(host_kernels)
    )
    assert numpy_outcome == cuda_outcome


def test_an_index_array_out_of_range_names_the_position_and_the_value(
    host_kernels: HostKernels, sampler: StratifiedPatching
) -> None:
    n = sampler.n_patches
    bad = np.array([0, 1, n + 4, -3], dtype=np.int64)
    for backend in _backends(host_kernels):
        with pytest.raises(IndexError, match=rf"indices\[2\] = {n + 4} .*\[0, {n}\)"):
            backend.draw(sampler._tables, bad, 0, 1)


@pytest.mark.parametrize(
    ("draw_number", "seed", "error"),
    [
        (-1, 1, ValueError),
        (2**32, 1, ValueError),
        (1.5, 1, TypeError),
        (True, 1, TypeError),
        (0, -1, ValueError),
        (0, 2**64, ValueError),
        (0, None, TypeError),
        (0, "7", TypeError),
    ],
)
def test_a_bad_draw_number_or_seed_is_the_same_error_on_both_backends(
    host_kernels: HostKernels, sampler: StratifiedPatching, draw_number: Any, seed: Any, error: Any
) -> None:
    messages = set()
    for backend in _backends(host_kernels):
        with pytest.raises(error) as caught:
            backend.draw(sampler._tables, range(4), draw_number, seed)
        messages.add(str(caught.value))
    assert len(messages) == 1
