"""Mining: the pure pieces against brute force, the per-video miner on synthetic videos with known
motion, and the corpus-level run (resume, bad input, shards, the CLI)."""

import itertools
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from conftest import ROOT

from vidrep.data.corpus import CorpusError, PairIndex, read_manifest, read_records
from vidrep.data.synthetic import SyntheticVideo
from vidrep.mining.decode import VideoError, read_frames
from vidrep.mining.inputs import InputError, list_videos, select_shard
from vidrep.mining.miner import MinerConfig, VideoMiner, frame_verdict
from vidrep.mining.motion import PointMotion, balanced_subset, point_motion, residual_flow
from vidrep.mining.points import surf_available
from vidrep.mining.run import mine_corpus
from vidrep.mining.window import best_window, window_counts

# ---------------------------------------------------------------- pure pieces


def test_window_counts_match_brute_force():
    rng = np.random.default_rng(0)
    height, width, size = 23, 31, 7
    points = rng.uniform(0, [width, height], size=(60, 2)).astype(np.float32)
    counts = window_counts(points, height, width, size)
    assert counts.shape == (height - size + 1, width - size + 1)
    for y, x in itertools.product(range(counts.shape[0]), range(counts.shape[1])):
        inside = (points[:, 0] >= x) & (points[:, 0] < x + size) & (points[:, 1] >= y) & (points[:, 1] < y + size)
        assert counts[y, x] == inside.sum()


@pytest.mark.parametrize("seed", range(5))
def test_best_window_holds_the_most_points(seed):
    rng = np.random.default_rng(seed)
    height, width, size = 40, 50, 12
    cluster = rng.normal(rng.uniform(10, 40, 2), 3, size=(30, 2))
    points = np.concatenate([cluster, rng.uniform(0, [width, height], size=(30, 2))]).astype(np.float32)
    points = np.clip(points, 0, [width - 1, height - 1])
    x, y, count = best_window(points, height, width, size)
    brute = max(
        int(
            (
                (points[:, 0] >= bx) & (points[:, 0] < bx + size) & (points[:, 1] >= by) & (points[:, 1] < by + size)
            ).sum()
        )
        for by in range(height - size + 1)
        for bx in range(width - size + 1)
    )
    assert count == brute
    inside = (points[:, 0] >= x) & (points[:, 0] < x + size) & (points[:, 1] >= y) & (points[:, 1] < y + size)
    assert inside.sum() == brute


def test_best_window_centres_a_lone_cluster():
    """All positions holding a small cluster tie; the chosen one puts it mid-window."""
    points = np.array([[50, 40], [52, 41], [51, 43]], np.float32)
    x, y, count = best_window(points, 100, 120, 21)
    assert count == 3
    assert abs(x + 10.5 - 51) <= 1.5 and abs(y + 10.5 - 41.5) <= 1.5


def test_window_larger_than_frame_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        window_counts(np.zeros((0, 2), np.float32), 100, 300, 227)


def test_balanced_subset_matches_brute_force():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, [600, 448], size=(500, 2)).astype(np.float32)
    points[:200] = rng.uniform(0, [75, 75], size=(200, 2))  # a crowded corner
    picked = balanced_subset(points, 448, 600, (8, 6), 3)
    expected = []
    per_cell = {}
    for i, (px, py) in enumerate(points):
        cell = (min(int(px * 8 / 600), 7), min(int(py * 6 / 448), 5))
        if per_cell.get(cell, 0) < 3:
            expected.append(i)
            per_cell[cell] = per_cell.get(cell, 0) + 1
    np.testing.assert_array_equal(picked, expected)


def test_residual_flow_is_what_the_homography_leaves():
    rng = np.random.default_rng(2)
    h = np.array([[1.01, 0.02, 3.0], [-0.01, 0.99, -2.0], [1e-5, 2e-5, 1.0]])
    points = rng.uniform(0, 400, size=(50, 2))
    pts = np.c_[points, np.ones(50)] @ h.T
    moved = pts[:, :2] / pts[:, 2:]
    np.testing.assert_allclose(residual_flow(points, moved, h), 0, atol=1e-9)
    shifted = moved + np.array([3.0, 4.0])
    np.testing.assert_allclose(residual_flow(points, shifted, h), 5.0, atol=1e-9)


def _motion(fraction_moving: float, n: int = 100, homography=True) -> PointMotion:
    residual = np.where(np.arange(n) < round(fraction_moving * n), 2.0, 0.1).astype(np.float32)
    return PointMotion(np.zeros((n, 2), np.float32), residual, np.eye(3) if homography else None)


@pytest.mark.parametrize(
    "motion, verdict",
    [
        (_motion(0.5, n=10), "rejected_few_points"),
        (_motion(0.5, homography=False), "rejected_no_camera_model"),
        (_motion(0.24), "rejected_static"),
        (_motion(0.25), None),
        (_motion(0.75), None),
        (_motion(0.76), "rejected_camera_motion"),
    ],
)
def test_frame_rejection_rules(motion, verdict):
    assert frame_verdict(motion, MinerConfig()) == verdict


def test_config_is_checked():
    with pytest.raises(ValueError, match="min_moving"):
        MinerConfig(min_moving=0.8, max_moving=0.5)
    if not surf_available():
        with pytest.raises(ValueError, match="OPENCV_ENABLE_NONFREE"):
            VideoMiner(MinerConfig(detector="surf"))


# ---------------------------------------------------------------- synthetic videos with known motion


def _grey(img):
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


@pytest.mark.parametrize("method", ["ransac", "usac", "usac_fast"])
def test_pure_camera_pan_moves_almost_no_point(method):
    video = SyntheticVideo(11, num_frames=30, num_objects=0, pan=(1.7, -0.9))
    detect = VideoMiner(MinerConfig()).detect
    for t in (5, 15, 25):
        prev, cur = _grey(video.frame(t - 1)), _grey(video.frame(t))
        motion = point_motion(prev, cur, detect(cur), homography_method=method)
        assert len(motion.points) > 100
        assert (motion.residual > 0.5).mean() < 0.05
        # The camera model recovered the pan: frame t -> t-1 shifts by +pan.
        np.testing.assert_allclose(motion.homography[:2, 2], [1.7, -0.9], atol=0.15)


def _cover(box, window) -> float:
    """Share of `box` (x, y, w, h) inside `window`."""
    x, y, w, h = box
    wx, wy, ww, wh = window
    iw = max(0, min(x + w, wx + ww) - max(x, wx))
    ih = max(0, min(y + h, wy + wh) - max(y, wy))
    return iw * ih / (w * h)


def test_query_window_covers_the_moving_object_and_the_track_follows_it(tmp_path):
    """KCF follows the whole 227 window, mostly static background, so it drifts off the object
    now and then (the paper's method does the same; tracking at 224 instead of 112 px does no
    better). Every query holds over half an object (most hold a whole one; two objects can share
    the window); at least 65 % of tracked boxes (~90 % over the demo corpus) still hold over half of
    that object 30 frames later."""
    miner, query_cover, tracked_cover, unmoved_cover = VideoMiner(MinerConfig()), [], [], []
    for seed in (1, 2, 3, 4, 5):
        video = SyntheticVideo(seed, num_frames=160, object_speed=(3.0, 4.0))
        result = miner.mine(video.write(tmp_path / f"{seed}.avi"))
        assert result.stats["pairs"] >= 1, dict(result.stats)
        for r in result.records:
            assert r.tracked_frame - r.query_frame == 30
            covers = [_cover(box, r.query_box) for box in video.boxes(r.query_frame)]
            obj = int(np.argmax(covers))
            query_cover.append(covers[obj])
            tracked_cover.append(_cover(video.boxes(r.tracked_frame)[obj], r.tracked_box))
            unmoved_cover.append(_cover(video.boxes(r.tracked_frame)[obj], r.query_box))
            assert cv2.imdecode(np.frombuffer(r.query_jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (227, 227, 3)
        starts = [r.query_frame for r in result.records]
        assert all(b > a + 30 for a, b in zip(starts, starts[1:])), "tracks overlap"
    assert len(query_cover) >= 12
    assert min(query_cover) > 0.5 and np.mean(query_cover) > 0.9, query_cover
    assert np.mean(np.array(tracked_cover) >= 0.5) >= 0.65, tracked_cover
    # and the tracker does follow: a box left where the query was holds far less of the object
    assert np.mean(tracked_cover) > np.mean(unmoved_cover) + 0.15, (tracked_cover, unmoved_cover)


def test_frames_no_stage_looks_at_are_never_scaled(tmp_path, monkeypatch):
    """The cut test reads each frame's luma plane; only candidate frames (and the frame before
    each) and tracked frames are scaled to BGR."""
    from vidrep.mining import decode

    converted = []
    bgr = decode.Picture.bgr
    monkeypatch.setattr(decode.Picture, "bgr", lambda self: (self._bgr is None and converted.append(1)) or bgr(self))
    path = SyntheticVideo(5, num_frames=60, num_objects=0, pan=(0.0, 0.0)).write(tmp_path / "still.avi")
    result = VideoMiner(MinerConfig()).mine(path)
    assert result.stats["tracks"] == 0 and result.stats["candidates"] == 11
    assert len(converted) == 2 * result.stats["candidates"]  # of 60 frames


def test_static_camera_without_motion_gives_no_pair(tmp_path):
    path = SyntheticVideo(5, num_frames=60, num_objects=0, pan=(0.0, 0.0)).write(tmp_path / "still.avi")
    result = VideoMiner(MinerConfig()).mine(path)
    assert result.stats["pairs"] == 0
    assert result.stats["rejected_static"] == result.stats["candidates"] > 0


def test_a_track_never_crosses_a_shot_cut(tmp_path):
    a, b = SyntheticVideo(6, num_frames=50, num_objects=1), SyntheticVideo(7, num_frames=50, num_objects=1)
    path = tmp_path / "cut.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (600, 448))
    for img in [*a.frames(), *b.frames()]:
        writer.write(img)
    writer.release()
    result = VideoMiner(MinerConfig()).mine(path)
    assert result.stats["tracks_cut"] + result.stats["rejected_cut"] >= 1
    assert all(not (r.query_frame < 50 <= r.tracked_frame) for r in result.records)


def test_decoders_agree(tmp_path):
    path = SyntheticVideo(8, num_frames=10).write(tmp_path / "v.avi")
    pyav = list(read_frames(path, decoder="pyav"))
    ocv = list(read_frames(path, decoder="opencv"))
    assert len(pyav) == len(ocv) == 10
    assert pyav[0].shape == (448, 600, 3)
    assert np.abs(pyav[5].astype(int) - ocv[5].astype(int)).mean() < 3


def test_pyav_scaler_gives_the_pixels_of_a_fresh_one_per_frame(tmp_path):
    """decode.py keeps one single-threaded scaler per video for speed; the frames must be those
    PyAV's per-frame `to_ndarray(width=, height=)` gives (what corpora were mined from)."""
    import av

    path = SyntheticVideo(9, num_frames=6, height=360, width=480, object_size=(60, 120)).write(tmp_path / "v.avi")
    with av.open(str(path)) as container:
        expected = [
            f.to_ndarray(format="bgr24", width=600, height=448, interpolation="AREA") for f in container.decode(video=0)
        ]
    got = list(read_frames(path))
    assert len(got) == len(expected) == 6
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


# ---------------------------------------------------------------- the corpus-level run


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for seed in range(4):
        SyntheticVideo(100 + seed, num_frames=100).write(folder / f"v{seed}.avi")
    return folder


def _pairs(root):
    table = read_manifest(root)
    index = PairIndex(root, table)
    rows = table.select(["pair_id", "video", "query_frame", "tracked_frame", "query_box", "tracked_box"]).to_pylist()
    return sorted((r["pair_id"], str(r), index.read_pair(i)) for i, r in enumerate(rows))


@pytest.fixture(scope="module")
def reference_corpus(video_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "corpus"
    summary = mine_corpus(video_dir, root, MinerConfig(), workers=1, progress=False)
    assert summary.run["videos_mined"] == 4 and summary.run["pairs"] > 0
    return root


def test_sharded_runs_give_the_pairs_of_one_run(video_dir, reference_corpus, tmp_path):
    root = tmp_path / "sharded"
    for shard in range(3):
        mine_corpus(video_dir, root, MinerConfig(), shard=shard, num_shards=3, workers=2, progress=False)
    assert _pairs(root) == _pairs(reference_corpus)


def test_rerun_skips_done_videos(video_dir, reference_corpus):
    before = _pairs(reference_corpus)
    summary = mine_corpus(video_dir, reference_corpus, MinerConfig(), workers=1, progress=False)
    assert summary.run["videos_skipped_done"] == 4 and summary.run["videos_mined"] == 0
    assert _pairs(reference_corpus) == before
    assert summary.corpus["videos_mined"] == 4


def test_other_settings_cannot_extend_a_corpus(video_dir, reference_corpus):
    with pytest.raises(CorpusError, match="detector"):
        mine_corpus(video_dir, reference_corpus, MinerConfig(detector="fast"), workers=1, progress=False)


def test_shards_split_videos_disjointly(video_dir):
    videos = list_videos(video_dir)
    shards = [select_shard(videos, i, 3) for i in range(3)]
    names = sorted(v.name for s in shards for v in s)
    assert names == sorted(v.name for v in videos)


def test_bad_inputs_are_recorded_and_skipped(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = SyntheticVideo(9, num_frames=80).write(folder / "good.avi")
    (folder / "empty.avi").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 100)
    data = good.read_bytes()
    (folder / "truncated.avi").write_bytes(data[: len(data) // 8])  # decodes, but too few frames
    (folder / "garbage.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    SyntheticVideo(10, num_frames=20).write(folder / "short.avi")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*(p.name for p in sorted(folder.iterdir())), "# a comment", "", "missing.avi"]))
    for p in folder.iterdir():
        (tmp_path / p.name).symlink_to(p)
    summary = mine_corpus(listing, tmp_path / "corpus", MinerConfig(), workers=2, progress=False)
    failures = {r["video"]: r["reason"] for r in read_records(tmp_path / "corpus", "failures").to_pylist()}
    assert failures == {
        "empty.avi": "empty_file",
        "text.mp4": "unreadable",
        "truncated.avi": "too_short",
        "garbage.avi": "unreadable",
        "short.avi": "too_short",
        "missing.avi": "missing",
    }
    assert summary.run["videos_mined"] == 1 and summary.run["videos_failed"] == 6
    # failures count as done: a rerun does not try them again unless asked to
    again = mine_corpus(listing, tmp_path / "corpus", MinerConfig(), workers=1, progress=False)
    assert again.run["videos_skipped_done"] == 7
    retry = mine_corpus(listing, tmp_path / "corpus", MinerConfig(), workers=1, retry_failures=True, progress=False)
    assert retry.run["videos_failed"] == 6 and retry.run["videos_skipped_done"] == 1


def test_a_worker_crash_costs_only_the_video_that_caused_it(tmp_path):
    from conftest import CrashingMiner

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(4):
        SyntheticVideo(200 + i, num_frames=40).write(folder / f"ok{i}.avi")
    SyntheticVideo(300, num_frames=40).write(folder / "crash.avi")
    summary = mine_corpus(
        folder, tmp_path / "corpus", MinerConfig(), workers=2, progress=False, miner_factory=CrashingMiner
    )
    failures = {r["video"]: r["reason"] for r in read_records(tmp_path / "corpus", "failures").to_pylist()}
    assert failures == {"crash.avi": "worker_crashed"}
    assert summary.run["videos_mined"] == 4 and summary.run["videos_failed"] == 1


@pytest.mark.slow
def test_a_hanging_video_is_stopped_and_recorded_as_timeout(tmp_path):
    """A hang next to a crash: the hung video's worker is killed at its limit (in the pool and
    when retried alone), the crash is still found, and every other video is mined."""
    from conftest import HangingMiner

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        SyntheticVideo(200 + i, num_frames=40).write(folder / f"ok{i}.avi")
    SyntheticVideo(300, num_frames=40).write(folder / "crash.avi")
    SyntheticVideo(301, num_frames=40).write(folder / "hang.avi")
    start = time.perf_counter()
    summary = mine_corpus(
        folder, tmp_path / "corpus", MinerConfig(video_timeout=3), workers=2, progress=False, miner_factory=HangingMiner
    )
    failures = {r["video"]: r["reason"] for r in read_records(tmp_path / "corpus", "failures").to_pylist()}
    assert failures == {"crash.avi": "worker_crashed", "hang.avi": "timeout"}
    assert summary.run["videos_mined"] == 3 and summary.failures == {"worker_crashed": 1, "timeout": 1}
    assert time.perf_counter() - start < 120
    # the limit is not a corpus setting: a rerun with another one resumes the same corpus
    again = mine_corpus(folder, tmp_path / "corpus", MinerConfig(video_timeout=60), workers=1, progress=False)
    assert again.run["videos_skipped_done"] == 5


def test_default_video_timeout_follows_the_declared_length(tmp_path):
    from vidrep.mining.watchdog import TIMEOUT_FLOOR_S, TIMEOUT_UNKNOWN_LENGTH_S, declared_frames, default_timeout

    assert default_timeout(None) == TIMEOUT_UNKNOWN_LENGTH_S
    assert default_timeout(100) == TIMEOUT_FLOOR_S
    assert default_timeout(36_000) == 36_000 / 5.0
    assert declared_frames(SyntheticVideo(7, num_frames=60).write(tmp_path / "v.avi")) == 60
    (tmp_path / "text.mp4").write_text("not a video")
    assert declared_frames(tmp_path / "text.mp4") is None
    with pytest.raises(ValueError, match="video_timeout"):
        MinerConfig(video_timeout=0)


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_videos(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no file ending in"):
        list_videos(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no video"):
        list_videos(tmp_path / "list.txt")


def test_video_errors_name_the_file(tmp_path):
    (tmp_path / "x.avi").write_bytes(b"")
    with pytest.raises(VideoError, match="x.avi has zero bytes"):
        next(iter(read_frames(tmp_path / "x.avi")))


def _mine_cli(*args, **kw):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "mine.py"), *args], cwd=kw.pop("cwd"), env=env, capture_output=True, text=True, **kw
    )


def test_cli_mines_and_reports(video_dir, reference_corpus, tmp_path):
    out = _mine_cli(f"videos={video_dir}", f"out={tmp_path / 'c'}", "progress=false", "workers=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pairs" in out.stdout and "videos_mined" in out.stdout
    assert _pairs(tmp_path / "c") == _pairs(reference_corpus)
    missing = _mine_cli(f"out={tmp_path / 'c'}", cwd=tmp_path)
    assert missing.returncode != 0 and "videos" in missing.stderr


@pytest.mark.slow
def test_multirun_shards_through_the_joblib_launcher(video_dir, reference_corpus, tmp_path):
    out = _mine_cli(
        "-m",
        "shard=range(0,2)",
        "num_shards=2",
        f"videos={video_dir}",
        f"out={tmp_path / 'c'}",
        "progress=false",
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert _pairs(tmp_path / "c") == _pairs(reference_corpus)
    assert sorted(p.name for p in (tmp_path / "outputs/mine/multirun").glob("*/shard*")) == ["shard0", "shard1"]


@pytest.mark.slow
def test_kill_9_then_rerun_loses_nothing_and_duplicates_nothing(video_dir, reference_corpus, tmp_path):
    root = tmp_path / "c"
    for delay in (1.5, 3.0):  # two interruptions at different moments, then a clean finish
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "mine.py"),
                f"videos={video_dir}",
                f"out={root}",
                "progress=false",
                "workers=2",
            ],
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (root / "manifest").is_dir() and any((root / "manifest").glob("*.parquet")):
            visible = read_manifest(root)  # whatever is visible is whole: every listed JPEG reads back
            index = PairIndex(root, visible)
            for i in range(len(index)):
                q, t = index.read_pair(i)
                assert q[:2] == t[:2] == b"\xff\xd8"
    out = _mine_cli(f"videos={video_dir}", f"out={root}", "progress=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _pairs(root) == _pairs(reference_corpus)


# ---------------------------------------------------------------- identity, verify, repair


def test_one_video_one_identity(tmp_path):
    import shutil

    folder = tmp_path / "videos"
    folder.mkdir()
    SyntheticVideo(21, num_frames=40).write(folder / "a.avi")
    SyntheticVideo(22, num_frames=40).write(folder / "d_other.avi")
    shutil.copy(folder / "a.avi", folder / "b_copy.avi")
    (folder / "c_link.avi").symlink_to(folder / "d_other.avi")
    os.mkfifo(folder / "e_fifo.avi")
    (folder / "f_loop.avi").symlink_to(folder / "g_loop.avi")
    (folder / "g_loop.avi").symlink_to(folder / "f_loop.avi")
    summary = mine_corpus(folder, tmp_path / "corpus", MinerConfig(), workers=0, progress=False)
    failures = {
        r["video"]: (r["reason"], r["detail"]) for r in read_records(tmp_path / "corpus", "failures").to_pylist()
    }
    assert {k: v[0] for k, v in failures.items()} == {
        "b_copy.avi": "duplicate",
        "d_other.avi": "duplicate",
        "e_fifo.avi": "not_a_file",
        "f_loop.avi": "not_a_file",
        "g_loop.avi": "not_a_file",
    }
    assert "content of a.avi" in failures["b_copy.avi"][1] and "content of c_link.avi" in failures["d_other.avi"][1]
    assert "FIFO" in failures["e_fifo.avi"][1] and "symlink loop" in failures["f_loop.avi"][1]
    assert summary.run["videos_mined"] == 2
    assert sorted(read_records(tmp_path / "corpus", "videos").column("video").to_pylist()) == ["a.avi", "c_link.avi"]
    # one file under three names in a list: mined once
    listing = tmp_path / "list.txt"
    listing.write_text(f"videos/a.avi\n./videos/a.avi\n{folder / 'a.avi'}\n")
    problems = {v.name: v.problem and v.problem[0] for v in list_videos(listing)}
    assert sorted(map(str, problems.values())) == ["None", "duplicate", "duplicate"]
    with pytest.raises(InputError, match="FIFO"):  # never opened: reading it would block
        list_videos(folder / "e_fifo.avi")


def test_verify_and_repair_keep_intact_pairs_and_remine_exactly_the_rest(video_dir, reference_corpus, tmp_path):
    import json
    import shutil
    import warnings

    import pyarrow.parquet as pq

    from vidrep.data.corpora import open_index
    from vidrep.data.corpus import DamagedCorpusError

    root = tmp_path / "c"
    shutil.copytree(reference_corpus, root)
    rows = {p.stem: pq.read_table(p).to_pylist() for p in (root / "manifest").glob("*.parquet")}
    keys = sorted(rows, key=lambda k: (-len(rows[k]), k))  # keys[0]: the video with the most pairs
    assert len(rows[keys[0]]) >= 2
    row = rows[keys[0]][0]
    with open(root / "shards" / f"{keys[0]}.tar", "r+b") as f:  # 600 bytes inside one JPEG
        f.seek(row["query_offset"] + 300)
        f.write(bytes(600))
    (root / "manifest" / f"{keys[1]}.parquet").unlink()  # a lost manifest
    (root / "videos" / f"{keys[2]}.parquet").write_bytes(b"")  # a 0-byte done mark
    with pytest.raises(DamagedCorpusError, match=f"{keys[2]}.parquet.*verify=true"):
        mine_corpus(video_dir, root, MinerConfig(), workers=1, progress=False)
    out = _mine_cli(f"out={root}", "verify=true", "workers=1", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    for key, what in ((keys[0], "CRC32"), (keys[1], "manifest missing"), (keys[2], "done mark is 0 bytes")):
        assert any(key in line and what in line for line in out.stdout.splitlines()), (key, out.stdout)
    assert keys[3] not in out.stdout and "verify=repair" in out.stdout
    out = _mine_cli(f"out={root}", "verify=repair", "workers=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _mine_cli(f"out={root}", "verify=true", "workers=1", cwd=tmp_path).returncode == 0
    # the video with one damaged JPEG keeps its other pairs and stays done; the loss is recorded
    assert json.loads((root / "repaired.json").read_text()) == {keys[0]: {"video": row["video"], "pairs_lost": 1}}
    assert json.loads((root / "summary.json").read_text())["pairs_lost_to_repair"] == 1
    again = mine_corpus(video_dir, root, MinerConfig(), workers=1, progress=False)
    assert again.run["videos_mined"] == 2 and again.run["videos_skipped_done"] == 2
    assert again.corpus["pairs_lost_to_repair"] == 1
    expected = [p for p in _pairs(reference_corpus) if p[0] != row["pair_id"]]
    assert _pairs(root) == expected
    with warnings.catch_warnings(record=True) as caught:  # training on it says what was lost
        warnings.simplefilter("always")
        index = open_index(root)
    assert len(index) == len(expected)
    assert any("1 pairs were removed by `verify=repair`" in str(w.message) for w in caught), caught


def test_a_byte_copy_mined_in_a_later_run_is_recorded_as_duplicate(tmp_path):
    import shutil

    folder = tmp_path / "videos"
    folder.mkdir()
    SyntheticVideo(31, num_frames=40).write(folder / "a.avi")
    root = tmp_path / "corpus"
    first = mine_corpus(folder, root, MinerConfig(), workers=0, progress=False)
    assert first.run["videos_mined"] == 1
    mark = read_records(root, "videos").to_pylist()[0]
    assert mark["content_size"] == (folder / "a.avi").stat().st_size and len(mark["content_blake2b"]) == 64
    later = tmp_path / "more_videos"  # a second batch of videos, mined into the same corpus
    later.mkdir()
    shutil.copy(folder / "a.avi", later / "b_copy.avi")
    SyntheticVideo(32, num_frames=40).write(later / "c_new.avi")
    second = mine_corpus(later, root, MinerConfig(), workers=0, progress=False)
    assert second.run["videos_mined"] == 1 and second.run["videos_failed"] == 1
    failures = {r["video"]: r for r in read_records(root, "failures").to_pylist()}
    assert list(failures) == ["b_copy.avi"] and failures["b_copy.avi"]["reason"] == "duplicate"
    assert "content of a.avi, already mined into this corpus" in failures["b_copy.avi"]["detail"]
    assert sorted(read_records(root, "videos").column("video").to_pylist()) == ["a.avi", "c_new.avi"]


def test_a_truncated_mining_json_is_a_clear_error_and_verify_reports_it(video_dir, reference_corpus, tmp_path):
    import shutil

    from vidrep.data.corpus import DamagedCorpusError
    from vidrep.mining.verify import verify_corpus

    root = tmp_path / "c"
    shutil.copytree(reference_corpus, root)
    settings = root / "mining.json"
    settings.write_bytes(settings.read_bytes()[:40])
    with pytest.raises(DamagedCorpusError, match=r"mining.json is damaged \(not valid JSON.*Restore it"):
        mine_corpus(video_dir, root, MinerConfig(), workers=1, progress=False)
    damaged = verify_corpus(root)
    assert [(d.key, d.video) for d in damaged] == [("(corpus)", "mining.json")]
    assert "mining.json is damaged" in damaged[0].problems[0]


# ---------------------------------------------------------------- real footage


def _layout(jpeg: bytes) -> np.ndarray:
    """A 16x16 grey thumbnail, zero-mean and unit-norm: its dot product is a normalised
    cross-correlation that compares layout, not just colours (one animated scene shares those)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    v = cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-9)


def test_real_videos_give_pairs_of_the_same_thing_and_damage_never_stops_the_run(sample_videos, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("Megamind.avi", "Megamind_bugy.avi", "vtest.avi"):
        (folder / name).symlink_to(sample_videos / name)
    data = bytearray((sample_videos / "Megamind.avi").read_bytes())
    third = len(data) // 3
    data[third : 2 * third] = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    (folder / "scrambled_middle.avi").write_bytes(bytes(data))
    (folder / "cut_short.avi").write_bytes((sample_videos / "Megamind.avi").read_bytes()[:40_000])
    summary = mine_corpus(folder, tmp_path / "corpus", MinerConfig(), workers=2, progress=False)
    assert summary.run["videos_mined"] + summary.run["videos_failed"] == 5
    failures = {r["video"]: r["reason"] for r in read_records(tmp_path / "corpus", "failures").to_pylist()}
    assert failures == {"cut_short.avi": "too_short"}
    done = {r["video"]: r for r in read_records(tmp_path / "corpus", "videos").to_pylist()}
    assert done["vtest.avi"]["frames"] == 795 and done["Megamind.avi"]["frames"] == 270
    assert done["Megamind.avi"]["pairs"] >= 3 and done["Megamind_bugy.avi"]["pairs"] >= 3
    # vtest: a static camera on small pedestrians; with GFTT only ~14 % of the points move, under
    # the paper's 25 % floor (see the detector table in docs/mining.md), so nearly every frame is rejected.
    assert done["vtest.avi"]["rejected_static"] >= 0.9 * done["vtest.avi"]["candidates"]
    # Same thing in both patches: each tracked patch correlates better with its own query than
    # with the queries of the other pairs of its video.
    table = read_manifest(tmp_path / "corpus")
    index = PairIndex(tmp_path / "corpus", table)
    videos = table.column("video").to_pylist()
    hits = total = 0
    for name in ("Megamind.avi", "Megamind_bugy.avi"):
        rows = [i for i, v in enumerate(videos) if v == name]
        q = [_layout(index.read_pair(i)[0]) for i in rows]
        t = [_layout(index.read_pair(i)[1]) for i in rows]
        for a in range(len(rows)):
            hits += int(np.argmax([t[a] @ q[b] for b in range(len(rows))]) == a)
            total += 1
    assert hits / total >= 0.8, (hits, total)


def test_orb_finds_the_pedestrians_of_a_static_camera(sample_videos):
    result = VideoMiner(MinerConfig(detector="orb")).mine(sample_videos / "vtest.avi", "vtest.avi")
    assert result.stats["pairs"] >= 10, dict(result.stats)


def test_motion_screen_settles_only_beyond_doubt():
    from vidrep.mining.motion import MotionScreen

    screen = MotionScreen(200, moving_px=0.5, min_moving=0.25, max_moving=0.75)
    assert screen.indices(399) is None and len(np.unique(screen.indices(1000))) == 200
    residual = lambda moving, n=200: np.r_[np.ones(moving), np.zeros(n - moving)]  # noqa: E731
    # 4 sigma of a 200-point sample at a share of 0.25 is 0.12: shares under 0.13 (or over 0.87) settle
    assert screen.settled(residual(20)) and screen.settled(residual(190))
    assert not screen.settled(residual(30)) and not screen.settled(residual(100)) and not screen.settled(residual(170))
    assert not screen.settled(residual(0, n=80))  # most of the sample lost: not enough to judge


def test_screened_motion_gives_the_verdicts_of_all_points(sample_videos):
    """On real footage (a static camera, a moving one), every candidate frame's verdict is the same
    whether the screen settles it on a sample or all points are followed, and a frame it does not
    settle gets exactly the motion of all points."""
    from vidrep.mining.motion import MotionScreen
    from vidrep.mining.points import gftt_with_weak_corners

    config = MinerConfig(detector="gftt")
    screen = MotionScreen(config.motion_sample, config.moving_px, config.min_moving, config.max_moving)
    settled = judged = 0
    for name in ("vtest.avi", "Megamind.avi"):
        frames = [_grey(f) for f, _ in zip(read_frames(sample_videos / name), range(121))]
        for t in range(5, len(frames), 5):
            points, weak = gftt_with_weak_corners(frames[t], config.max_points)
            args = (frames[t - 1], frames[t], points)
            full = point_motion(*args, weak_corners=weak, homography_method="usac")
            fast = point_motion(*args, weak_corners=weak, homography_method="usac", screen=screen)
            assert frame_verdict(fast, config) == frame_verdict(full, config), (name, t)
            if len(fast.points) < len(full.points):
                settled += 1
            else:
                np.testing.assert_array_equal(fast.residual, full.residual)
            judged += 1
    assert settled >= judged // 4  # the screen does save work on this footage


def test_settings_added_later_keep_older_corpora_resumable():
    legacy = MinerConfig(homography_method="ransac", motion_sample=0)
    assert "homography_method" not in legacy.corpus_settings() and "motion_sample" not in legacy.corpus_settings()
    assert MinerConfig().corpus_settings()["homography_method"] == "usac"
    old_file = legacy.corpus_settings()  # what mining.json held before these keys existed
    assert MinerConfig.from_corpus_settings(old_file) == legacy
    with pytest.raises(ValueError, match="homography_method"):
        MinerConfig(homography_method="lmeds")


def test_tracker_key_keeps_the_settings_of_corpora_mined_before_it():
    kcf = MinerConfig()
    assert kcf.tracker == "kcf" and "tracker" not in kcf.corpus_settings()
    # a mining.json written before the key existed still matches today's default miner
    assert MinerConfig.from_corpus_settings(kcf.corpus_settings()) == kcf
    assert MinerConfig(tracker="csrt").corpus_settings()["tracker"] == "csrt"
    assert MinerConfig.from_corpus_settings(MinerConfig(tracker="csrt").corpus_settings()).tracker == "csrt"
    with pytest.raises(ValueError, match="miner.tracker"):
        MinerConfig(tracker="goturn")


def test_the_tracker_is_swapped_by_config(tmp_path, monkeypatch):
    """miner.tracker=mosse from mine.yaml builds that tracker for every track and no KCF (MOSSE:
    the cheapest alternative; CSRT costs ~5 s here)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vidrep.mining import tracking

    name = "mosse"
    with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        cfg = compose("mine", overrides=["videos=x", "out=y", f"miner.tracker={name}"])
    config = instantiate(cfg.miner)
    assert config.tracker == name and config.corpus_settings()["tracker"] == name
    built = []
    for kind, create in list(tracking.TRACKERS.items()):
        monkeypatch.setitem(
            tracking.TRACKERS, kind, lambda patch, kind=kind, create=create: built.append(kind) or create(patch)
        )
    path = SyntheticVideo(1, num_frames=100, object_speed=(3.0, 4.0)).write(tmp_path / "v.avi")
    result = VideoMiner(config).mine(path)
    assert result.stats["tracks"] >= 1 and built == [name] * result.stats["tracks"]
    assert result.stats["pairs"] >= 1, dict(result.stats)
    for r in result.records:
        assert r.tracked_box[2:] == (227, 227)


def test_one_corner_pass_gives_exactly_the_gftt_detector_points():
    from vidrep.mining.points import gftt_with_weak_corners, make_detector

    gray = _grey(SyntheticVideo(12, num_frames=1).frame(0))
    strong, weak = gftt_with_weak_corners(gray, 300)
    np.testing.assert_array_equal(strong, make_detector("gftt", 300)(gray))
    assert len(weak) > len(strong)


def test_auto_detector_resolves_to_what_this_opencv_has():
    assert MinerConfig().detector == ("surf" if surf_available() else "gftt")
    assert MinerConfig().to_dict()["detector"] != "auto"
