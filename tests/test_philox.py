"""Philox4x32-10 and the counter layout (docs/design.md section 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_patching import rng

# Random123's published known-answer vectors for Philox4x32-10 (kat_vectors):
# (counter words, key words, output words).
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = rng.philox4x32_10(counter, key)
    assert tuple(int(w) for w in words) == expected


def test_philox_outputs_are_32_bit_words_in_uint64_storage():
    words = rng.philox4x32_10(
        (np.arange(100), np.uint32(7), np.uint32(0xFFFFFFFF), 3), (12345, 0xFFFFFFFF)
    )
    for word in words:
        assert word.dtype == np.uint64
        assert word.shape == (100,)
        assert int(word.max()) <= 0xFFFFFFFF


def test_vectorised_philox_equals_element_by_element_evaluation():
    generator = np.random.default_rng(20240611)
    counters = generator.integers(0, 1 << 32, size=(4, 257), dtype=np.uint64)
    key = (0x9E3779B9, 0x0BADF00D)
    vectorised = rng.philox4x32_10(tuple(counters), key)
    for column in range(counters.shape[1]):
        single = rng.philox4x32_10(tuple(int(c) for c in counters[:, column]), key)
        assert tuple(int(w) for w in single) == tuple(int(w[column]) for w in vectorised)


def test_philox_broadcasts_scalar_counter_words_against_arrays():
    index = np.arange(50, dtype=np.uint64)
    key = (1, 2)
    broadcast = rng.philox4x32_10((index, 5, 0, 0), key)
    explicit = rng.philox4x32_10(
        (index, np.full(50, 5), np.zeros(50, np.int64), np.zeros(50, np.int64)), key
    )
    for got, want in zip(broadcast, explicit, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, (1 << 64) - 1, 0x0123456789ABCDEF])
@pytest.mark.parametrize("purpose", [rng.PURPOSE_STRATUM, rng.PURPOSE_SHUFFLE])
def test_random_uint32_uses_the_documented_counter_layout(seed, purpose):
    # counter = (index & 0xffffffff, draw_number, purpose, index >> 32)
    # key     = (seed & 0xffffffff, seed >> 32)
    indices = [0, 1, 2, 12345, (1 << 32) - 1, 1 << 32, (1 << 32) + 7, (1 << 40) + 3]
    draw_number = 17
    words = rng.random_uint32(seed, np.asarray(indices, dtype=np.int64), draw_number, purpose)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for index, word in zip(indices, words, strict=True):
        counter = (index & 0xFFFFFFFF, draw_number, purpose, index >> 32)
        assert int(word) == int(rng.philox4x32_10(counter, key)[0])


def test_random_uint32_keeps_the_high_word_of_large_indices():
    # Indices that agree in their low 32 bits must still give different words.
    low = rng.random_uint32(99, [5], 0, rng.PURPOSE_STRATUM)
    high = rng.random_uint32(99, [5 + (1 << 32)], 0, rng.PURPOSE_STRATUM)
    assert int(low[0]) != int(high[0])


def test_random_uint32_depends_on_seed_draw_number_and_purpose():
    indices = np.arange(64)
    base = rng.random_uint32(7, indices, 3, rng.PURPOSE_STRATUM)
    assert not np.array_equal(base, rng.random_uint32(8, indices, 3, rng.PURPOSE_STRATUM))
    assert not np.array_equal(base, rng.random_uint32(7, indices, 4, rng.PURPOSE_STRATUM))
    assert not np.array_equal(base, rng.random_uint32(7, indices, 3, rng.PURPOSE_SHUFFLE))
    np.testing.assert_array_equal(base, rng.random_uint32(7, indices, 3, rng.PURPOSE_STRATUM))


def test_random_uint32_words_are_roughly_uniform():
    words = rng.random_uint32(2024, np.arange(1 << 16), 0, rng.PURPOSE_STRATUM)
    counts = np.bincount((words >> np.uint64(28)).astype(np.int64), minlength=16)
    expected = len(words) / 16
    # Each bin count has standard error sqrt(expected * 15/16) ~ 62; allow 8 SE.
    assert np.all(np.abs(counts - expected) < 8 * np.sqrt(expected))


@pytest.mark.parametrize("bad_word", [-1, 1 << 32])
def test_philox_rejects_counter_words_outside_32_bits(bad_word):
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        rng.philox4x32_10((bad_word, 0, 0, 0), (0, 0))


def test_philox_rejects_non_integer_counter_words():
    with pytest.raises(TypeError, match="float64"):
        rng.philox4x32_10((np.array([0.5]), 0, 0, 0), (0, 0))


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1, 0x123456789ABCDEF0])
@pytest.mark.parametrize("purpose", [rng.PURPOSE_STRATUM, rng.PURPOSE_SHUFFLE, 2**32 - 1])
def test_counter_prefix_gives_the_words_of_the_full_rounds(seed, purpose):
    generator = np.random.default_rng(seed % 1000)
    indices = np.concatenate([np.arange(64), generator.integers(0, 2**32, 500)]).astype(np.int64)
    prefix = rng.CounterPrefix(seed, indices, purpose)
    for draw_number in (0, 1, 77, 2**31, 2**32 - 1):
        expected = rng.random_uint32_pair(seed, indices, draw_number, purpose)
        got = prefix.words(draw_number)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # Its arrays are never written by a draw: the same words again.
    again = prefix.words(77)
    np.testing.assert_array_equal(again[0], rng.random_uint32_pair(seed, indices, 77, purpose)[0])


def test_counter_prefix_refuses_indices_with_a_high_word():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rng.CounterPrefix(1, np.array([2**32], dtype=np.int64), rng.PURPOSE_STRATUM)


@pytest.mark.parametrize("seed", [0, 0x0123456789ABCDEF, 2**64 - 1])
@pytest.mark.parametrize("purpose", [rng.PURPOSE_STRATUM, rng.PURPOSE_SHUFFLE])
def test_one_counter_in_python_ints_gives_the_words_of_the_vectorised_generator(seed, purpose):
    indices = [0, 1, 77, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1]
    for number in (0, 5, 2**32 - 1):
        word0, word1 = rng.random_uint32_pair(seed, indices, number, purpose)
        for position, index in enumerate(indices):
            pair = rng.random_pair_int(seed, index, number, purpose)
            assert pair == (int(word0[position]), int(word1[position]))
            assert all(type(word) is int for word in pair)


def test_the_host_philox_is_written_once_in_rng():
    # The multiplier of the rounds appears in one host module only: every other
    # module that needs random bits calls rng.
    package = Path(rng.__file__).parent
    holders = [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        if "D2511F53" in path.read_text(encoding="utf-8").upper()
    ]
    assert holders == ["rng.py"]
