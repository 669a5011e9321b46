"""The retrieval protocol (vidrep/eval/retrieval.py), evaluate.py protocol=retrieval and the demo's check."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from vidrep.eval.retrieval import (
    colour_histogram,
    num_candidates,
    pixels,
    retrieval_metrics,
    retrieval_ranks,
)


def brute_force_ranks(query, tracked, video):
    ranks = []
    for i in range(len(query)):
        own = float(query[i] @ tracked[i])
        rank = 1
        for j in range(len(query)):
            if j != i and video[j] != video[i] and float(query[i] @ tracked[j]) >= own:
                rank += 1
        ranks.append(rank)
    return np.array(ranks)


@pytest.mark.parametrize("chunk_elements", [1, 37, 1 << 24])
def test_ranks_match_a_brute_force_loop_with_ties_and_one_pair_videos(chunk_elements):
    rng = np.random.default_rng(0)
    # few distinct values: many exact ties; videos 7 and 9 have one pair each
    query = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
    tracked = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
    tracked[::2] = 2 * query[::2]  # some queries find theirs first
    video = np.array([1] * 5 + [2] * 4 + [7] + [3] * 6 + [9] + [4] * 6)
    ranks = retrieval_ranks(query, tracked, video, chunk_elements=chunk_elements)
    expected = brute_force_ranks(query, tracked, video)
    np.testing.assert_array_equal(ranks, expected)
    assert (expected > 1).any() and (expected == 1).any()


def test_a_tie_counts_against_the_query():
    query = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    tracked = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    # pair 0's own similarity 1 ties with pair 1's tracked patch (another video)
    np.testing.assert_array_equal(retrieval_ranks(query, tracked, np.array([0, 1, 2])), [2, 2, 1])
    # pair 1 shares pair 0's video: it is no candidate of pair 0
    np.testing.assert_array_equal(retrieval_ranks(query, tracked, np.array([0, 0, 2])), [1, 1, 1])


def test_metrics_match_their_definitions():
    ranks = np.array([1, 1, 2, 5, 6, 100, 1, 3])
    video = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    m = retrieval_metrics(ranks, video)
    assert m["recall_at_1"] == pytest.approx(3 / 8) and m["recall_at_5"] == pytest.approx(6 / 8)
    assert m["median_rank"] == 2.5 and m["num_pairs"] == 8 and m["num_videos"] == 4
    loop = [1 + sum(video[j] != video[i] for j in range(len(video))) for i in range(len(video))]
    np.testing.assert_array_equal(num_candidates(video), loop)
    assert m["num_candidates_mean"] == pytest.approx(np.mean(loop))


def test_colour_histogram_on_hand_made_patches():
    one = np.zeros((227, 227, 3), np.uint8)
    one[...] = (200, 10, 100)  # bins 3, 0, 1 -> 16*3 + 0 + 1
    two = np.zeros((227, 227, 3), np.uint8)
    two[:, :100] = (63, 64, 255)  # bins 0, 1, 3 -> 7: 100 columns
    two[:, 100:] = (128, 191, 192)  # bins 2, 2, 3 -> 43: 127 columns
    h = colour_histogram(np.stack([one, two]))
    assert h.shape == (2, 64)
    expected_one = np.zeros(64)
    expected_one[49] = 1.0
    expected_two = np.zeros(64)
    expected_two[7], expected_two[43] = 100 * 227, 127 * 227
    np.testing.assert_allclose(h[0], expected_one, atol=1e-6)
    np.testing.assert_allclose(h[1], expected_two / np.linalg.norm(expected_two), atol=1e-6)


def test_pixels_on_hand_made_patches():
    flat = np.zeros((227, 227, 3), np.uint8)
    flat[...] = (10, 20, 30)  # 16x16 of (10, 20, 30), minus the mean 20: (-10, 0, 10) everywhere
    expected_flat = np.tile([-10.0, 0.0, 10.0], 256)
    rng = np.random.default_rng(1)
    # 2x2 blocks of mean `base` (+-1 inside each): INTER_AREA at 16x16 gives `base` exactly
    base = rng.integers(1, 255, size=(16, 16, 3))
    wiggle = np.kron(np.ones((16, 16)), [[1, -1], [-1, 1]])[..., None]
    blocks = (np.repeat(np.repeat(base, 2, axis=0), 2, axis=1) + wiggle).astype(np.uint8)
    small = base.astype(np.float64).ravel()
    p = pixels(np.stack([flat]))
    assert p.shape == (1, 768)
    np.testing.assert_allclose(p[0], expected_flat / np.linalg.norm(expected_flat), atol=1e-6)
    expected = small - small.mean()
    np.testing.assert_allclose(pixels(blocks[None])[0], expected / np.linalg.norm(expected), atol=1e-5)


def test_a_constant_patch_gives_zero_pixels_not_nan():
    assert np.all(pixels(np.full((1, 227, 227, 3), 77, np.uint8)) == 0)


def test_retrieval_needs_two_videos(tiny_corpus, tmp_path):
    from vidrep.data.corpus import CorpusError, read_manifest
    from vidrep.eval.retrieval import select_videos

    videos = sorted(set(read_manifest(tiny_corpus).column("video").to_pylist()))
    one = tmp_path / "one.txt"
    one.write_text(videos[0] + "\n")
    with pytest.raises(CorpusError, match="at least 2 videos"):
        select_videos(tiny_corpus, one)
    bad = tmp_path / "bad.txt"
    bad.write_text("no/such/video.mp4\n")
    with pytest.raises(CorpusError, match="not in corpus"):
        select_videos(tiny_corpus, bad)


def test_evaluate_protocol_retrieval(tiny_corpus, tmp_path):
    """evaluate.py on three videos of the tiny corpus: results.json as the issue lays it out, the
    pixels baseline's figures equal to the functions' own, and the gathered report shows them."""
    from vidrep.data.corpus import PairIndex, read_manifest
    from vidrep.eval.retrieval import RetrievalSettings, baseline_featurizer, retrieval_results

    table = read_manifest(tiny_corpus)
    names = np.array(table.column("video").to_pylist(), dtype=object)
    videos = sorted(set(names))[:3]
    (tmp_path / "videos.txt").write_text("\n".join(videos) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "protocol=retrieval",
            "ckpt=pixels",
            f"retrieval.corpus={tiny_corpus}",
            f"retrieval.videos={tmp_path / 'videos.txt'}",
            "retrieval.candidates=other_videos",
            "wandb.enabled=false",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = np.flatnonzero(np.isin(names, videos))
    other_videos = RetrievalSettings(candidates="other_videos")
    expected = retrieval_results(PairIndex(tiny_corpus), rows, [baseline_featurizer("pixels")], settings=other_videos)
    expected = expected["pixels"]
    assert result["retrieval"] == {"pixels": pytest.approx(expected)}
    assert result["retrieval"]["pixels"]["num_videos"] == 3 and result["retrieval"]["pixels"]["num_pairs"] == len(rows)
    assert result["data"]["videos"] == videos and result["data"]["corpus"] == str(tiny_corpus.resolve())
    assert result["retrieval_settings"] == {
        "candidates": "other_videos",
        "min_gap_frames": 90,
        "distractors": 8,
        "max_distractor_iou": 0.3,
    }
    assert "| pixels |" in (tmp_path / "run" / "results.md").read_text()
    gathered = subprocess.run(
        [sys.executable, "-m", "vidrep.eval.report", str(tmp_path / "run" / "results.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gathered.returncode == 0, gathered.stderr[-3000:]
    assert f"| pixels | {100 * expected['recall_at_1']:.1f} |" in gathered.stdout
