"""gpu-patching demo: a like-for-like comparison, its numbers and its pictures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.cli import main
from gpu_patching.demo import (
    PICTURE_NAMES,
    corner_weights,
    coverage_map,
    expected_coverage,
    run_demo,
)

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("skimage")

PNG = b"\x89PNG\r\n\x1a\n"


def textured_image(seed: int = 0) -> np.ndarray:
    """Noisy texture on the left, a flat (background) band on the right."""
    image = np.random.default_rng(seed).normal(100, 20, (96, 128)).astype(np.float32)
    image[:, 64:] = 5.0
    return image


# -- the distribution every sampler of the demo draws from ---------------------


def test_coverage_map_counts_the_patches_over_each_pixel():
    corners = np.array([[0, 0], [2, 3], [2, 3], [5, 1]])
    expected = np.zeros((8, 9), dtype=np.int64)
    for y, x in corners:
        expected[y : y + 3, x : x + 4] += 1
    np.testing.assert_array_equal(coverage_map(corners, (3, 4), (8, 9)), expected)


def test_expected_coverage_is_the_weighted_sum_over_every_corner():
    shape, patch = (11, 13), (3, 4)
    weights = np.random.default_rng(1).random((shape[0] - 2, shape[1] - 3))
    weights[2:4] = 0
    brute = np.zeros(shape)
    for y, x in itertools.product(range(weights.shape[0]), range(weights.shape[1])):
        brute[y : y + 3, x : x + 4] += weights[y, x]
    np.testing.assert_allclose(
        expected_coverage(weights, 7, patch, shape), brute * 7 / weights.sum(), atol=1e-12
    )


def test_corner_weights_hold_the_region_probability_and_zero_next_to_excluded_cells():
    shape, patch = (20, 26), (4, 5)  # grid 5x5; last corners at 16, 21
    excluded = np.zeros((5, 5), dtype=bool)
    excluded[2, 3] = True
    probabilities = np.ones((5, 5))
    probabilities[0, 0] = 0.25
    weights = corner_weights(excluded, probabilities, patch, shape)
    assert weights.shape == (17, 22)
    for y, x in itertools.product(range(17), range(22)):
        rows = range(y // 4, (y + 3) // 4 + 1)
        cols = range(x // 5, (x + 4) // 5 + 1)
        touches = any(r == 2 and c == 3 for r in rows for c in cols)
        assert weights[y, x] == (0.0 if touches else probabilities[y // 4, x // 5])


def test_corner_weights_reject_grids_of_another_shape():
    with pytest.raises(ValueError, match=r"grid shape \(5, 5\)"):
        corner_weights(np.zeros((4, 5), bool), np.ones((5, 5)), (4, 5), (20, 26))
    with pytest.raises(ValueError, match="non-negative"):
        corner_weights(np.zeros((5, 5), bool), -np.ones((5, 5)), (4, 5), (20, 26))


def test_our_draws_follow_the_corner_weights_the_demo_compares_against():
    shape, patch = (40, 50), (8, 8)
    sampler = StratifiedPatching([(1, 1, *shape)], patch, seed=5, backend="numpy")
    sampler.exclude_patches(0, 0, [(1, 1), (3, 4)])
    probabilities = np.ones((5, 6))
    probabilities[4] = 0.2
    probabilities[0, :3] = 3.0
    sampler.set_region_probs(0, 0, probabilities)
    weights = corner_weights(
        sampler.get_excluded_cells(0, 0), sampler.get_region_probs(0, 0), patch, shape
    )
    corners = np.concatenate([sampler.sample_epoch(k).coords for k in range(300)])
    # Never a corner of weight 0 (it would overlap an excluded cell) ...
    assert np.all(weights[corners[:, 0], corners[:, 1]] > 0)
    # ... and each region drawn as often as its share of the weight says.
    cells = corners // np.array(patch)
    drawn = np.zeros((5, 6))
    np.add.at(drawn, (cells[:, 0], cells[:, 1]), 1)
    share = np.zeros((5, 6))
    rows, cols = np.indices(weights.shape)
    np.add.at(share, (rows // 8, cols // 8), weights)
    expected = share / share.sum() * len(corners)
    sigma = np.sqrt(expected + 1)
    assert np.all(np.abs(drawn - expected) < 6 * sigma)


# -- run_demo -----------------------------------------------------------------


def test_background_is_chosen_by_otsu_on_the_region_statistic(capsys):
    results = run_demo(
        textured_image(), name="bands", patch_size=(16, 16), epochs=1, backend="numpy",
        validation_fraction=0.0, background_stat="std", compare_careamics=False,
        progress=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "Otsu" in printed
    assert f"std < {results['threshold']:.4g}" in printed
    # Grid 6x8 cells of 16; the regions (32 wide) of columns 4-7 lie in the
    # flat band (std 0), every other region holds texture (std ~20 or more).
    assert results["threshold"] > 0
    assert results["background_regions"] == 6 * 4


def test_every_sampler_draws_from_one_distribution_and_none_touches_validation(capsys):
    results = run_demo(
        textured_image(), name="bands", patch_size=(16, 16), epochs=6, backend="numpy",
        compare_careamics=False, progress=False,
    )  # fmt: skip
    labels = [run.label for run in results["runs"]]
    assert labels == ["ours (numpy)", "independent random draws"]
    for run in results["runs"]:
        assert run.touched_validation == 0
        assert len(run.spreads) == 6
        # Six epochs of 48 patches are still well above the limit here.
        assert min(run.spreads) > results["limit"] * 0.95
    printed = capsys.readouterr().out
    assert "limit (expected coverage)" in printed
    assert "CAREamics StratifiedPatching   not run: left out on request" in printed


def test_stratified_epochs_cover_more_evenly_than_independent_draws():
    # The point of stratification: over several seeds, one epoch of ours
    # leaves fewer pixels uncovered and spreads less than independent draws.
    image = np.random.default_rng(3).normal(100, 20, (160, 192)).astype(np.float32)
    wins = 0
    for seed in range(4):
        ours, independent = run_demo(
            image, name="noise", patch_size=(16, 16), epochs=1, seed=seed, backend="numpy",
            validation_fraction=0.0, background_threshold=0.0, compare_careamics=False,
            progress=False,
        )["runs"]  # fmt: skip
        wins += ours.spreads[0] < independent.spreads[0]
        wins += ours.uncovered_first_epoch < independent.uncovered_first_epoch
    assert wins >= 7


def test_careamics_row_uses_the_same_exclusions_and_probabilities(reference, capsys):
    results = run_demo(
        textured_image(), name="bands", patch_size=(16, 16), epochs=2, backend="numpy",
        progress=False,
    )  # fmt: skip
    ours, theirs, _ = results["runs"]
    assert theirs.label == "CAREamics StratifiedPatching"
    assert theirs.n_patches == ours.n_patches
    assert theirs.touched_validation == 0
    assert results["careamics"] == ""


def test_without_careamics_the_table_says_why(monkeypatch, capsys):
    def missing():
        raise ImportError("the reference needs careamics==0.3.5")

    monkeypatch.setattr("gpu_patching.testing.load_reference", missing)
    results = run_demo(
        textured_image(), name="bands", patch_size=(16, 16), epochs=1, backend="numpy",
        progress=False,
    )  # fmt: skip
    assert len(results["runs"]) == 2
    printed = capsys.readouterr().out
    assert "CAREamics StratifiedPatching   not run: the reference needs careamics==0.3.5" in printed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"validation_fraction": 0.7}, "validation fraction"),
        ({"filtered_prob": -1.0}, "filtered probability"),
        ({"background_threshold": float("nan")}, "background threshold"),
    ],
)
def test_run_demo_rejects_bad_settings_before_any_work(options, message, capsys):
    with pytest.raises(ValueError, match=message):
        run_demo(textured_image(), name="x", progress=False, **options)
    assert capsys.readouterr().out == ""


def test_run_demo_says_so_when_the_filter_leaves_nothing_to_sample():
    with pytest.raises(ValueError, match="no patches left"):
        run_demo(
            textured_image(), name="x", patch_size=(16, 16), background_stat="std",
            background_threshold=1e9, filtered_prob=0.0, compare_careamics=False,
            progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_run_demo_rejects_an_image_with_non_finite_pixels_before_any_work(bad, capsys):
    image = textured_image()
    image[3, 4] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite pixels"):
        run_demo(image, name="x", progress=False)
    assert capsys.readouterr().out == ""


# -- the command ----------------------------------------------------------------


def test_demo_on_a_named_stack_says_which_sample_and_channel_and_draws_pictures(tmp_path, capsys):
    stack = np.stack([np.stack([textured_image(s + c) for c in range(3)]) for s in range(2)])
    path = tmp_path / "stack.npy"
    np.save(path, stack)
    output = tmp_path / "new" / "pictures"  # a missing folder is created
    status = main(
        ["demo", "--image", str(path), "--axes", "SCYX", "--sample", "1", "--channel", "2",
         "--patch", "16", "16", "--epochs", "5", "--output", str(output), "--no-progress",
         "--backend", "numpy", "--no-careamics"]
    )  # fmt: skip
    assert status == 0
    for name in PICTURE_NAMES:
        assert (output / name).read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "sample 1 of 2, channel 2 of 3" in printed
    for label in ("ours (numpy)", "independent random draws", "limit", "spread@5", "Otsu"):
        assert label in printed


def test_demo_defaults_to_the_bundled_cell_image(tmp_path, monkeypatch, capsys):
    drawn = []  # the pictures themselves are drawn (and checked) in the test above

    def record(folder, scene, runs):
        drawn.append((folder, scene.name, scene.image.shape, [run.label for run in runs]))
        return [folder / name for name in PICTURE_NAMES]

    monkeypatch.setattr("gpu_patching.demo.draw_demo_pictures", record)
    status = main(["demo", "--epochs", "1", "--output", str(tmp_path), "--no-progress",
                   "--backend", "numpy", "--no-careamics"])  # fmt: skip
    assert status == 0
    assert "'cell'" in capsys.readouterr().out
    [(folder, name, shape, labels)] = drawn
    assert folder == tmp_path
    assert "'cell'" in name
    assert shape == (660, 550)
    assert labels == ["ours (numpy)", "independent random draws"]


def test_demo_rejects_a_3d_stack_with_one_line(tmp_path, capsys):
    path = tmp_path / "volume.npy"
    np.save(path, np.zeros((8, 32, 32), dtype=np.uint8))
    assert main(["demo", "--image", str(path), "--axes", "ZYX", "--output", str(tmp_path)]) == 2
    assert "2D" in capsys.readouterr().err


def test_demo_rejects_a_sample_or_channel_out_of_range(tmp_path, capsys):
    path = tmp_path / "two.npy"
    np.save(path, np.zeros((2, 32, 32), dtype=np.uint8))
    arguments = ["demo", "--image", str(path), "--axes", "SYX", "--output", str(tmp_path / "o")]
    assert main([*arguments, "--sample", "2"]) == 2
    assert "--sample 2 is out of range" in capsys.readouterr().err
    assert main([*arguments, "--channel", "1"]) == 2
    assert "--channel 1 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- the words of the report and the pictures match the run's numbers -----------


def picture_words(path) -> str:
    """Every text a picture shows (titles, captions, legends), as stored in the PNG."""
    from PIL import Image

    with Image.open(path) as picture:
        return picture.text["Description"]


@pytest.fixture(scope="module", params=[0.0, 0.1, 1.0, 2.5], ids=lambda p: f"filtered_prob={p}")
def demo_words(request, tmp_path_factory):
    """One demo run per background probability: its results and every word it wrote."""
    import contextlib
    import io

    output = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_demo(
            textured_image(), name="bands", patch_size=(16, 16), epochs=4, backend="numpy",
            output=output, filtered_prob=request.param, compare_careamics=False, progress=False,
        )  # fmt: skip
    pictures = {name: picture_words(output / name) for name in PICTURE_NAMES}
    return request.param, results, printed.getvalue(), pictures


def test_no_word_calls_the_spread_of_the_expected_coverage_a_floor(demo_words):
    # A run's spread can fall below the spread of the expected coverage (its
    # noise can lean against the border and background dips); only the
    # limit over many epochs is certain, so nothing may promise a floor.
    _, results, printed, pictures = demo_words
    for words in (printed, *pictures.values()):
        assert "floor" not in words.lower()
        assert "go below" not in words and "can beat" not in words
    limit = f"{results['limit']:.3f}"
    assert "limit (expected coverage)" in printed
    assert limit in printed and limit in pictures["coverage.png"]


#: What the words must say about background at each filtered_prob, and never.
BACKGROUND_WORDS = {
    0.0: ("never drawn", ("drawn less often", "drawn more often")),
    0.1: ("drawn less often", ("never drawn", "drawn more often")),
    1.0: ("drawn as often as", ("never drawn", "drawn less often", "drawn more often")),
    2.5: ("drawn more often", ("never drawn", "drawn less often")),
}


def test_the_words_on_background_follow_the_filtered_probability(demo_words):
    filtered_prob, _, printed, pictures = demo_words
    said, never_said = BACKGROUND_WORDS[filtered_prob]
    for words in (printed, pictures["region-probabilities.png"], pictures["coverage.png"]):
        assert said in words
        for claim in never_said:
            assert claim not in words


def test_a_threshold_given_by_the_user_is_not_credited_to_otsu(tmp_path, capsys):
    run_demo(
        textured_image(), name="bands", patch_size=(16, 16), epochs=1, backend="numpy",
        output=tmp_path, background_stat="std", background_threshold=7.5,
        compare_careamics=False, progress=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    words = picture_words(tmp_path / "image.png")
    for text in (printed, words):
        assert "Otsu" not in text
        assert "threshold given" in text


def cell_image() -> np.ndarray:
    from skimage import data

    return data.cell().astype(np.float32)


def test_default_background_keeps_every_region_of_the_bundled_cell():
    # scikit-image's 'cell': one round cell, about y 312-436 and x 364-491,
    # bright and flat inside, in grey saline. Cells are 32 pixels and a
    # region spans cells g and g + 1, so regions (10..12, 11..14) hold cell.
    results = run_demo(
        cell_image(), name="cell", epochs=1, backend="numpy", validation_fraction=0.0,
        compare_careamics=False, progress=False,
    )  # fmt: skip
    probabilities = results["region_probabilities"]
    assert np.all(probabilities[10:13, 11:15] == 1.0)


def test_default_background_filters_the_empty_saline_of_the_bundled_cell():
    results = run_demo(
        cell_image(), name="cell", epochs=1, backend="numpy", validation_fraction=0.0,
        compare_careamics=False, progress=False,
    )  # fmt: skip
    probabilities = results["region_probabilities"]
    # Regions 0..7 x 0..9 cover y < 288 and x < 352: saline only.
    assert np.all(probabilities[:8, :10] == 0.1)


def test_the_command_defaults_to_the_background_statistic_of_run_demo():
    import inspect

    from gpu_patching.cli import build_parser

    default = inspect.signature(run_demo).parameters["background_stat"].default
    assert build_parser().parse_args(["demo"]).background_stat == default == "foreground"


def test_expected_coverage_is_exactly_zero_where_no_patch_reaches():
    # Weights 0.1 and 1 leave rounding residue in the cumulative sums; a pixel
    # that no weighted corner reaches must still read 0 (the pictures leave
    # exactly those pixels bare).
    shape, patch = (64, 80), (8, 8)
    weights = np.full((57, 73), 0.1)
    weights[:, 30:] = 0.0
    weights[:20, :10] = 1.0
    coverage = expected_coverage(weights, 13, patch, shape)
    unreachable = np.zeros(shape, dtype=bool)
    unreachable[:, 30 + 7 :] = True
    assert np.all(coverage[unreachable] == 0.0)
    assert np.all(coverage[~unreachable] > 0.0)
