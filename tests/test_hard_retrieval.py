"""retrieval.candidates=hard (vidrep/eval/retrieval.py, vidrep/eval/distractors.py): candidate sets
against brute-force references, the sign test against scipy, distractors cut as the miner cuts and
byte-identical across two evaluations, and the error of a corpus without them."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vidrep.data.corpus import CorpusError, PairIndex, read_manifest
from vidrep.eval.distractors import box_iou, distractor_boxes, encode, folder, write_distractors
from vidrep.eval.retrieval import (
    RetrievalSettings,
    baseline_featurizer,
    compare_pairs,
    decode_patch,
    load_queries,
    num_candidates,
    pixels,
    ranks_by_feature,
    retrieval_ranks,
    sign_test_p,
)


def brute_force_hard(query, tracked, video, frame, gap, distractors, owner):
    """Each query's candidates listed one by one: own, same video >= gap away, its distractors, other videos."""
    ranks, counts = [], []
    for i in range(len(query)):
        own = float(query[i] @ tracked[i])
        cands = [tracked[j] for j in range(len(query)) if j != i and video[j] != video[i]]
        if gap is not None:
            cands += [
                tracked[j]
                for j in range(len(query))
                if j != i and video[j] == video[i] and abs(frame[j] - frame[i]) >= gap
            ]
            cands += [distractors[k] for k in range(len(owner)) if owner[k] == i]
        ranks.append(1 + sum(float(query[i] @ c) >= own for c in cands))
        counts.append(1 + len(cands))
    return np.array(ranks), np.array(counts)


def random_case(seed):
    rng = np.random.default_rng(seed)
    n = 31
    # few distinct values: many exact ties
    query = rng.integers(-1, 2, size=(n, 3)).astype(np.float32)
    tracked = rng.integers(-1, 2, size=(n, 3)).astype(np.float32)
    tracked[::3] = 2 * query[::3]
    video = np.array([1] * 9 + [2] * 4 + [7] + [3] * 8 + [9] + [4] * 8)
    frame = rng.integers(0, 300, size=n)
    owner = np.sort(rng.integers(0, n, size=70))  # some pairs have none, some several
    distractors = rng.integers(-1, 2, size=(70, 3)).astype(np.float32)
    return query, tracked, video, frame, distractors, owner


@pytest.mark.parametrize("chunk_elements", [1, 37, 1 << 24])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_ranks_match_a_brute_force_loop(chunk_elements, seed):
    query, tracked, video, frame, distractors, owner = random_case(seed)
    ranks = retrieval_ranks(query, tracked, video, frame, 90, distractors, owner, chunk_elements)
    expected, counts = brute_force_hard(query, tracked, video, frame, 90, distractors, owner)
    np.testing.assert_array_equal(ranks, expected)
    assert (expected == 1).any() and (expected > 1).any()
    np.testing.assert_array_equal(num_candidates(video, frame, 90, np.bincount(owner, minlength=len(video))), counts)
    # other_videos: no same-video pairs, no distractors
    plain = retrieval_ranks(query, tracked, video, chunk_elements=chunk_elements)
    np.testing.assert_array_equal(plain, brute_force_hard(query, tracked, video, frame, None, None, [])[0])


def test_ranks_in_torch_equal_numpy_with_tensors_in():
    query, tracked, video, frame, distractors, owner = random_case(2)
    expected = retrieval_ranks(query, tracked, video, frame, 90, distractors, owner)
    as_tensors = retrieval_ranks(
        torch.from_numpy(query), torch.from_numpy(tracked), video, frame, 90, torch.from_numpy(distractors), owner
    )
    np.testing.assert_array_equal(as_tensors, expected)
    if torch.cuda.is_available():
        on_gpu = retrieval_ranks(query, tracked, video, frame, 90, distractors, owner, device="cuda")
        np.testing.assert_array_equal(on_gpu, expected)


@pytest.mark.parametrize(
    "wins,losses",
    [(0, 0), (1, 0), (0, 1), (3, 3), (2, 13), (13, 2), (57, 155), (62, 42), (106, 134), (0, 40), (500, 620)],
)
def test_sign_test_equals_scipy_binomtest(wins, losses):
    from scipy.stats import binomtest

    expected = 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test_p(wins, losses) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_compare_pairs_counts_wins_and_losses_at_rank_one():
    ranks = np.array([1, 1, 2, 5, 1, 3])
    reference = np.array([1, 4, 1, 1, 2, 7])
    assert compare_pairs(ranks, reference) == {"wins": 2, "losses": 2, "p": 1.0}


def test_distractor_boxes_stay_inside_apart_and_repeat():
    box = (100, 80, 227, 227)
    boxes = distractor_boxes("abc_0000005", box, 448, 600, 8, 0.3)
    assert boxes.shape == (8, 4) and (boxes[:, 2:] == 227).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + 227 <= 600).all() and (boxes[:, 1] + 227 <= 448).all()
    assert (box_iou(box, boxes) <= 0.3).all()
    assert len({tuple(b) for b in boxes}) == 8
    np.testing.assert_array_equal(boxes, distractor_boxes("abc_0000005", box, 448, 600, 8, 0.3))
    assert not np.array_equal(boxes, distractor_boxes("abc_0000010", box, 448, 600, 8, 0.3))
    # a frame the window nearly fills: fewer fit, none breaks the IoU bound
    few = distractor_boxes("x", (0, 0, 227, 227), 240, 300, 8, 0.3)
    assert len(few) < 8 and (box_iou((0, 0, 227, 227), few) <= 0.3).all()


def test_box_iou_by_hand():
    np.testing.assert_allclose(
        box_iou((0, 0, 10, 10), [[5, 0, 10, 10], [10, 10, 4, 4], [0, 0, 10, 10]]), [50 / 150, 0, 1]
    )


@pytest.fixture(scope="module")
def videos(tiny_corpus):
    return tiny_corpus.with_name(f"{tiny_corpus.name}-videos")


@pytest.fixture(scope="module")
def hard_corpus(tiny_corpus, videos, tmp_path_factory):
    """A copy of the tiny corpus with its distractors cut from its videos."""
    root = tmp_path_factory.mktemp("hard") / "tiny"
    shutil.copytree(tiny_corpus, root)
    summary = write_distractors(root, videos)
    assert summary["failed"] == {} and summary["done"] == len(set(read_manifest(root).column("video").to_pylist()))
    return root


def test_distractors_are_cut_as_the_miner_cut_the_tracked_patches(hard_corpus, videos):
    """Re-cutting each pair's tracked box with the distractors' code gives the very JPEG the miner stored."""
    from vidrep.mining.decode import read_frames

    table = read_manifest(hard_corpus)
    names = table.column("video").to_pylist()
    frames = list(read_frames(videos / names[0]))
    index = PairIndex(hard_corpus, table)
    mine = [i for i, v in enumerate(names) if v == names[0]]
    assert mine
    for i in mine:
        t = table.column("tracked_frame")[i].as_py()
        box = table.column("tracked_box")[i].as_py()
        assert encode(frames[t], box, 90) == index.read_pair(i)[1]


def test_hard_candidates_on_the_tiny_corpus_match_a_brute_force_reference(hard_corpus):
    """Ranks of the pixels baseline: each query's candidates gathered by hand from the manifest and
    the distractor files, its features computed patch by patch."""
    settings = RetrievalSettings()
    table = read_manifest(hard_corpus)
    index = PairIndex(hard_corpus, table)
    rows = np.arange(len(index))
    queries = load_queries(index, rows, settings)
    ranks = ranks_by_feature(queries, [baseline_featurizer("pixels")])["pixels"]

    def feat(jpeg):
        return pixels(decode_patch(jpeg)[None])[0]

    pair_ids = [index.pair_id(int(r)) for r in rows]
    own_distractors: dict[str, list[bytes]] = {}
    for f in folder(hard_corpus, 8, 0.3).glob("*.parquet"):
        t = pq.read_table(f)
        for pid, blob in zip(t.column("pair_id").to_pylist(), t.column("jpeg").to_pylist()):
            own_distractors.setdefault(pid, []).append(blob)
    q = [feat(index.read_pair(int(r))[0]) for r in rows]
    tr = [feat(index.read_pair(int(r))[1]) for r in rows]
    vid, frame = index.video_id, index.query_frame
    expected, kinds = [], {"same_video": 0, "distractors": 0, "other_videos": 0}
    for i in rows:
        own = float(q[i] @ tr[i])
        same = [j for j in rows if j != i and vid[j] == vid[i] and abs(int(frame[j]) - int(frame[i])) >= 90]
        other = [j for j in rows if vid[j] != vid[i]]
        dis = [feat(b) for b in own_distractors[pair_ids[i]]]
        kinds["same_video"] += len(same)
        kinds["distractors"] += len(dis)
        kinds["other_videos"] += len(other)
        sims = [float(q[i] @ tr[j]) for j in same + other] + [float(q[i] @ d) for d in dis]
        expected.append(1 + sum(s >= own for s in sims))
    np.testing.assert_array_equal(ranks, expected)
    assert all(v > 0 for v in kinds.values()), kinds
    assert len(own_distractors) == len(rows) and all(len(v) == 8 for v in own_distractors.values())


def test_distractors_are_byte_identical_across_two_evaluations_and_two_cuts(hard_corpus, videos, tmp_path):
    index = PairIndex(hard_corpus)
    rows = np.arange(len(index))
    first = load_queries(index, rows, RetrievalSettings()).distractors
    second = load_queries(PairIndex(hard_corpus), rows, RetrievalSettings()).distractors
    assert len(first.jpeg) == 8 * len(rows)
    assert first.jpeg == second.jpeg and np.array_equal(first.owner, second.owner)
    recut = tmp_path / "recut"
    shutil.copytree(hard_corpus, recut, ignore=shutil.ignore_patterns("distractors"))
    write_distractors(recut, videos)
    assert load_queries(PairIndex(recut), rows, RetrievalSettings()).distractors.jpeg == first.jpeg


def test_a_corpus_without_distractors_names_the_command(tiny_corpus):
    index = PairIndex(tiny_corpus)
    with pytest.raises(CorpusError, match=r"python -m vidrep\.eval\.distractors .*other_videos"):
        load_queries(index, np.arange(len(index)), RetrievalSettings())


def test_other_videos_or_damaged_files_are_refused(hard_corpus, videos, tmp_path):
    """A video that is not the one mined is recorded, not cut; a distractor altered by a byte is refused."""
    wrong = tmp_path / "wrong"
    shutil.copytree(hard_corpus, wrong / "corpus", ignore=shutil.ignore_patterns("distractors"))
    names = sorted(set(read_manifest(wrong / "corpus").column("video").to_pylist()))
    (wrong / "videos").mkdir()
    for a, b in zip(names, names[1:] + names[:1]):  # every name given another video's file
        shutil.copy(videos / b, wrong / "videos" / a)
    summary = write_distractors(wrong / "corpus", wrong / "videos")
    assert summary["done"] == 0 and len(summary["failed"]) == len(names)
    assert all("not_the_mined_video" in f["reason"] for f in summary["failed"].values())
    index = PairIndex(wrong / "corpus")
    with pytest.raises(CorpusError, match="failed"):
        load_queries(index, np.arange(len(index)), RetrievalSettings())
    damaged = tmp_path / "damaged"
    shutil.copytree(hard_corpus, damaged)
    victim = sorted(folder(damaged, 8, 0.3).glob("*.parquet"))[0]
    t = pq.read_table(victim)
    blobs = t.column("jpeg").to_pylist()
    blobs[0] = blobs[0][:100] + bytes([blobs[0][100] ^ 1]) + blobs[0][101:]
    pq.write_table(t.set_column(2, "jpeg", pa.array(blobs, pa.binary())), victim)
    with pytest.raises(CorpusError, match="CRC32"):
        load_queries(PairIndex(damaged), np.arange(len(index)), RetrievalSettings())


def test_hard_without_distractors_needs_no_files(tiny_corpus):
    """distractors=0: the same video's distant pairs and the other videos only, no distractor files read."""
    index = PairIndex(tiny_corpus)
    rows = np.arange(len(index))
    queries = load_queries(index, rows, RetrievalSettings(distractors=0))
    assert len(queries.distractors.jpeg) == 0
    ranks = ranks_by_feature(queries, [baseline_featurizer("colour_histogram")])["colour_histogram"]
    feats = {}
    for side in (0, 1):
        feats[side] = np.stack([colour_histogram_of(index.read_pair(int(r))[side]) for r in rows])
    expected, counts = brute_force_hard(
        feats[0], feats[1], index.video_id, index.query_frame, 90, np.zeros((0, 64)), np.zeros(0, np.int64)
    )
    np.testing.assert_array_equal(ranks, expected)
    np.testing.assert_array_equal(queries.num_candidates, counts)


def colour_histogram_of(jpeg):
    from vidrep.eval.retrieval import colour_histogram

    return colour_histogram(decode_patch(jpeg)[None])[0]
