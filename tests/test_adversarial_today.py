"""Adversarial inputs against the code paths of the host crop's threads, kernels and stores.

Each test pins an input that once gave a crash, a hang, a leak or a wrong
message; the results are compared with plain slicing or the documented error.
"""

from __future__ import annotations

import threading

import numpy as np

from gpu_patching import PatchBatch, extract_patches
from gpu_patching._row_threads import THREAD_LIMIT


def _copy_threads() -> int:
    return sum(thread.name.startswith("gpu_patching_copy_") for thread in threading.enumerate())


def test_a_huge_thread_count_starts_at_most_the_thread_limit_and_equals_slicing() -> None:
    n_rows = 3 * THREAD_LIMIT
    stack = np.arange(2 * 9 * 10, dtype=np.int16).reshape(1, 2, 9, 10)
    rng = np.random.default_rng(7)
    coords = np.stack([rng.integers(0, 8, n_rows), rng.integers(0, 9, n_rows)], axis=1)
    zeros = np.zeros(n_rows, dtype=np.int64)
    batch = PatchBatch(zeros, zeros, coords, np.arange(n_rows), (2, 2))
    patches = extract_patches([stack], batch, threads=2**62)
    expected = np.stack([stack[0, :, y : y + 2, x : x + 2] for y, x in coords])
    np.testing.assert_array_equal(patches, expected)
    # The calling thread takes one run; the pool never grows past the limit.
    assert _copy_threads() <= THREAD_LIMIT - 1
