"""The shipped count kernel, launched on the host, folds as NumPy does, bit for bit.

``subtract_in_order`` (``gpu_patching/kernels/count.cu``) is compiled by the
host C++ compiler and run over every block and thread of a launch, in a
permuted order (``tests/host_launch.py``); it is launched through
:func:`gpu_patching.grid.patch_budget`'s device branch, so the argument tuple
and the grid are the ones a GPU launch uses. Forced launch shapes (one
thread, one block, more threads than rows) show that the kernel's loop, not
the launch code, covers every row once. No GPU is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_launch import HostKernels, with_launch_shape

from gpu_patching import grid
from gpu_patching.kernels.count import SUBTRACT_IN_ORDER, subtract_in_order_args

#: Terms whose subtraction order changes the float64 result.
ORDER_SENSITIVE = np.array([0.9, 1 / 3, 1e-17, 0.1, 2.0 / 3, 1e-16, 0.7, 0.0, 1.0])

#: (grid, block) shapes forced on the same arguments.
LAUNCH_SHAPES = [((1,), (1,)), ((1,), (256,)), ((1,), (7,)), ((3,), (5,)), ((64,), (128,))]


def _random_budget_inputs(seed: int, batch: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and set orders as the tables hold them (some regions never set)."""
    generator = np.random.default_rng(seed)
    named = generator.choice(1.0 - ORDER_SENSITIVE, size=(batch, n_cells))
    uniform = generator.uniform(0.0, 3.0, size=(batch, n_cells))
    probability = np.where(generator.random((batch, n_cells)) < 0.6, named, uniform)
    set_order = generator.permutation(batch * n_cells).reshape(batch, n_cells).astype(np.int64)
    set_order[generator.random((batch, n_cells)) < 0.3] = -1
    return probability, set_order


def _reference_fold(start: float, terms: np.ndarray) -> np.ndarray:
    running = np.concatenate([np.full((terms.shape[0], 1), start), terms], axis=1)
    return np.subtract.accumulate(running, axis=1)[:, -1]


@pytest.mark.parametrize(("launch_grid", "block"), LAUNCH_SHAPES)
def test_the_kernel_subtracts_every_row_in_order_for_any_launch_shape(
    host_kernels: HostKernels, launch_grid: tuple[int, ...], block: tuple[int, ...]
) -> None:
    generator = np.random.default_rng(21)
    terms = generator.choice(ORDER_SENSITIVE, size=(41, 13))
    terms[::3] *= generator.uniform(0.0, 2.0, size=terms[::3].shape)
    total = np.full(41, 11.25)
    args = subtract_in_order_args(terms, total)
    host_kernels.function(SUBTRACT_IN_ORDER)(launch_grid, block, args)
    expected = _reference_fold(11.25, terms)
    assert total.view(np.uint64).tolist() == expected.view(np.uint64).tolist()


def test_the_order_of_the_terms_changes_the_result_the_kernel_gives() -> None:
    # The inputs above are order sensitive: a sum of the terms first rounds
    # differently, so a kernel that reassociated would fail the test above.
    terms = np.array([[0.9, 1 / 3, 1e-17, 0.1, 0.7]])
    assert _reference_fold(5.0, terms)[0] != 5.0 - terms.sum()


@pytest.mark.parametrize(("launch_grid", "block"), LAUNCH_SHAPES)
def test_the_device_budget_equals_the_numpy_budget_bit_for_bit(
    host_kernels: HostKernels, launch_grid: tuple[int, ...], block: tuple[int, ...]
) -> None:
    probability, set_order = _random_budget_inputs(seed=19, batch=23, n_cells=30)
    functions = with_launch_shape(host_kernels.functions(), launch_grid, block)
    expected = grid.patch_budget((31, 29), (3, 4), probability, set_order, np)
    got = grid.patch_budget((31, 29), (3, 4), probability, set_order, np, functions=functions)
    assert got.view(np.uint64).tolist() == expected.view(np.uint64).tolist()


def test_the_device_budget_launches_the_count_kernel_once(host_kernels: HostKernels) -> None:
    probability, set_order = _random_budget_inputs(seed=3, batch=5, n_cells=12)
    before = len(host_kernels.launches)
    grid.patch_budget(
        (12, 16), (4, 4), probability, set_order, np, functions=host_kernels.functions()
    )
    assert host_kernels.launches[before:] == [("subtract_in_order", (1, 1, 1), (256, 1, 1))]


@pytest.mark.parametrize(
    ("terms", "total", "error"),
    [
        (np.zeros(4), np.zeros(4), ValueError),
        (np.zeros((4, 2)), np.zeros(3), ValueError),
        (np.zeros((4, 2), dtype=np.float32), np.zeros(4), TypeError),
        (np.zeros((2, 4))[:, ::2], np.zeros(2), ValueError),
    ],
)
def test_the_count_arguments_refuse_arrays_the_kernel_would_misread(
    terms: np.ndarray, total: np.ndarray, error: type[Exception]
) -> None:
    with pytest.raises(error):
        subtract_in_order_args(terms, total)
