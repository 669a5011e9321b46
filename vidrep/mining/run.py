"""Mining many videos into one corpus: worker processes, resume, failures, the summary.

The unit of work and of commit is a video. Its pairs go to shards/<key>.tar and manifest/<key>.parquet
and then videos/<key>.parquet marks it done (failures/<key>.parquet for a video that cannot be
mined), each written atomically. A rerun skips every video with either mark; a video killed before
its mark is mined again and rewrites the same shard name with the same pairs, so nothing is
duplicated, and independent jobs (shards of one video list) never write the same names.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from vidrep import usable_cores
from vidrep.data.corpus import (
    REPAIRED,
    DamagedCorpusError,
    check_settings,
    damage_advice,
    init_corpus,
    read_records,
    write_failure,
    write_json,
    write_shard,
    write_video_record,
)
from vidrep.mining.decode import VideoError
from vidrep.mining.identity import content_id, find_mined_copies, mined_content
from vidrep.mining.inputs import VIDEO_EXTENSIONS, VideoInput, list_videos, select_shard
from vidrep.mining.miner import STAT_KEYS, MinerConfig, VideoMiner
from vidrep.mining.watchdog import POLL_S, TIMEOUT_FLOOR_S, Watchdog, declared_frames, default_timeout, report_started

log = logging.getLogger(__name__)
# KCF's PCA runs on OpenBLAS, which otherwise spins a second core per process for no gain.
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class VideoOutcome:
    key: str
    video: str
    ok: bool
    stats: dict
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0


def mine_one(miner: VideoMiner, root: Path, video: VideoInput) -> VideoOutcome:
    """Mine one video and commit it (pairs, then the done mark), or record why it failed.
    Any error a video causes is caught here: one bad file must not end a run of 100K."""
    start = time.perf_counter()
    content = content_id(video.path)
    try:
        result = miner.mine(video.path, video.name)
    except VideoError as e:
        reason, detail, stats = e.reason, e.detail, {}
    except Exception as e:  # noqa: BLE001 - decoders and OpenCV raise anything on odd input
        reason, detail, stats = "error", f"{type(e).__name__}: {e}", {}
    else:
        if result.records:
            write_shard(root, video.key, result.records)
        seconds = time.perf_counter() - start
        stats = {k: int(result.stats.get(k, 0)) for k in STAT_KEYS}
        write_video_record(
            root, video.key, {"video": video.name, "video_id": video.video_id, **stats, "seconds": seconds, **content}
        )
        return VideoOutcome(video.key, video.name, True, stats, seconds=seconds)
    seconds = time.perf_counter() - start
    write_failure(
        root, video.key, {"video": video.name, "video_id": video.video_id, "reason": reason, "detail": detail}
    )
    return VideoOutcome(video.key, video.name, False, stats, reason, detail, seconds)


_worker: tuple[VideoMiner, Path, MinerConfig, str | None] | None = None
MinerFactory = Callable[[MinerConfig], VideoMiner]


def _init_worker(config: MinerConfig, root: Path, factory: MinerFactory = VideoMiner, watch: str | None = None) -> None:
    import cv2

    cv2.setNumThreads(1)
    global _worker
    _worker = (factory(config), root, config, watch)


def _work(video: VideoInput) -> VideoOutcome:
    miner, root, config, watch = _worker
    if watch is not None:
        start = time.time()
        if config.video_timeout is not None:
            report_started(watch, video.key, start, config.video_timeout)
        else:
            # The floor until the length is known: the probe opens the file and could hang too.
            report_started(watch, video.key, start, TIMEOUT_FLOOR_S)
            report_started(watch, video.key, start, default_timeout(declared_frames(video.path)))
    return mine_one(miner, root, video)


def _pool(workers: int, config: MinerConfig, root: Path, factory: MinerFactory, watch: Watchdog) -> ProcessPoolExecutor:
    if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # Inside a job of Hydra's joblib launcher the default is 'loky': a spawned child is told to
        # use that start method and cannot resolve the name. This process only mines; reset it.
        mp.set_start_method("spawn", force=True)
    # spawn, not fork: OpenCV and OpenBLAS hold threads and locks a forked child must not inherit.
    return ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(config, root, factory, str(watch.folder)),
    )


def _refused(root: Path, video: VideoInput) -> VideoOutcome:
    """An input flagged before mining (not a regular file, a duplicate): recorded, never opened."""
    reason, detail = video.problem
    write_failure(
        root, video.key, {"video": video.name, "video_id": video.video_id, "reason": reason, "detail": detail}
    )
    return VideoOutcome(video.key, video.name, False, {}, reason, detail)


def _crashed(root: Path, video: VideoInput) -> VideoOutcome:
    detail = (
        f"{video.path}: the mining process died (a crash in a native decoder or OpenCV); "
        "rerun with retry_failures=true to try again"
    )
    write_failure(
        root, video.key, {"video": video.name, "video_id": video.video_id, "reason": "worker_crashed", "detail": detail}
    )
    return VideoOutcome(video.key, video.name, False, {}, "worker_crashed", detail)


def _timed_out(root: Path, video: VideoInput, limit: float) -> VideoOutcome:
    detail = (
        f"{video.path}: still not mined after {limit:.0f} s (a hanging decoder?); its worker was stopped. "
        "Set miner.video_timeout (seconds) higher and rerun with retry_failures=true if the video is just long"
    )
    write_failure(
        root, video.key, {"video": video.name, "video_id": video.video_id, "reason": "timeout", "detail": detail}
    )
    return VideoOutcome(video.key, video.name, False, {}, "timeout", detail, limit)


def _outcomes(
    videos: list[VideoInput], config: MinerConfig, root: Path, workers: int, factory: MinerFactory = VideoMiner
) -> Iterator[VideoOutcome]:
    """Outcomes in completion order. Videos run in worker processes (workers=0: in this process,
    for debugging), at most 2 per worker queued, so that when a native crash kills a worker only
    the videos in flight are suspects: each is then retried alone in a fresh process, and the one
    that kills that too is recorded as a failure. A multiprocessing.Pool would hang instead.
    A video past its time limit (vidrep.mining.watchdog) has its worker killed and is recorded as
    `timeout`; the others in flight are then innocent and go back to the queue. workers=0 has
    no time limit."""
    if workers <= 0:
        _init_worker(config, root, factory)
        for v in videos:
            yield _work(v)
        return
    os.environ.update(SINGLE_THREAD_ENV)  # inherited by the workers before they load OpenCV
    queue = deque(videos)
    watch = Watchdog()
    try:
        while queue:
            broken: list[VideoInput] = []
            finished: list[VideoOutcome] = []
            with _pool(workers, config, root, factory, watch) as pool:
                running: dict = {}
                try:
                    while queue or running:
                        while queue and len(running) < 2 * workers:
                            v = queue.popleft()
                            running[pool.submit(_work, v)] = v
                        done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
                        for future in done:
                            outcome = future.result()
                            del running[future]
                            yield outcome
                        watch.kill_overdue({v.key for v in running.values()})
                except BrokenProcessPool:
                    # A video may have finished between the last wait and a kill: it is done, not late.
                    for future, v in running.items():
                        if future.done() and not future.cancelled() and future.exception() is None:
                            finished.append(future.result())
                        else:
                            broken.append(v)
            watch.forget_workers()
            yield from finished
            late = [v for v in broken if v.key in watch.killed]
            suspects = [v for v in broken if v.key not in watch.killed]
            for v in late:
                yield _timed_out(root, v, watch.killed[v.key])
            if late:
                queue.extendleft(reversed(suspects))
                continue
            for v in suspects:
                yield _alone(v, config, root, factory, watch)
    finally:
        watch.close()


def _alone(video: VideoInput, config: MinerConfig, root: Path, factory: MinerFactory, watch: Watchdog) -> VideoOutcome:
    """One suspect of a crash, retried in a process of its own, under the same time limit."""
    with _pool(1, config, root, factory, watch) as alone:
        future = alone.submit(_work, video)
        try:
            while not wait([future], timeout=POLL_S).done:
                watch.kill_overdue({video.key})
            outcome = future.result()
        except BrokenProcessPool:
            outcome = (
                _timed_out(root, video, watch.killed[video.key]) if video.key in watch.killed else _crashed(root, video)
            )
    watch.forget_workers()
    return outcome


@dataclass
class RunSummary:
    """This run's counts (`run`) and the whole corpus's (`corpus`: every run and shard so far)."""

    run: Counter = field(default_factory=Counter)
    corpus: dict = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)

    def table(self) -> str:
        keys = ["videos_listed", "videos_skipped_done", "videos_mined", "videos_failed", *STAT_KEYS]
        width = max(map(len, keys))
        lines = [f"{'':{width}}  {'this run':>12}  {'corpus':>12}"]
        for k in keys:
            corpus = self.corpus.get(k, "")
            lines.append(
                f"{k:{width}}  {self.run.get(k, 0):>12,}  {corpus if corpus == '' else format(corpus, ','):>12}"
            )
        if self.failures:
            lines.append(
                "failures by reason (this run): " + ", ".join(f"{r} {n}" for r, n in self.failures.most_common())
            )
        return "\n".join(lines)


def corpus_totals(root: Path) -> dict:
    done, failed = read_records(root, "videos"), read_records(root, "failures")
    totals = {
        "videos_mined": 0 if done is None else done.num_rows,
        "videos_failed": 0 if failed is None else failed.num_rows,
    }
    for k in STAT_KEYS:
        totals[k] = 0 if done is None else int(sum(done.column(k).to_pylist()))
    if failed is not None:
        totals["failures_by_reason"] = dict(Counter(failed.column("reason").to_pylist()).most_common())
    repaired = root / REPAIRED
    if repaired.is_file():  # pairs verify=repair removed from videos it kept: training warns with the count
        totals["pairs_lost_to_repair"] = sum(int(v["pairs_lost"]) for v in json.loads(repaired.read_text()).values())
    return totals


def _done_keys(root: Path, retry_failures: bool) -> set[str]:
    marks = {
        d: [p for p in (root / d).glob("*.parquet") if not p.name.startswith(".")] if (root / d).is_dir() else []
        for d in ("videos", "failures")
    }
    # A 0-byte mark (a crash of the file system, not of mine.py: marks are renamed into place whole)
    # would skip its video now and break the totals later: stop before mining, naming it.
    empty = [str(p) for ps in marks.values() for p in ps if p.stat().st_size == 0]
    if empty:
        raise DamagedCorpusError(
            f"corpus {root}: {len(empty)} mark(s) of 0 bytes, e.g. {empty[0]}; {damage_advice(root)}"
        )
    done = {p.stem for p in marks["videos"]}
    if not retry_failures:
        done |= {p.stem for p in marks["failures"]}
    return done


def _flag_mined_copies(root: Path, todo: list[VideoInput]) -> list[VideoInput]:
    """`todo` with a byte copy of a video this corpus already holds (mined by an earlier run, under
    another name) flagged `duplicate`: mined again, it would give the same pairs under a new id,
    which could land in training and validation at once."""
    from dataclasses import replace

    fresh = [i for i, v in enumerate(todo) if v.problem is None]
    if not fresh:
        return todo
    known = mined_content([str(p) for p in (root / "videos").glob("*.parquet") if not p.name.startswith(".")])
    out = list(todo)
    for a, name in find_mined_copies([todo[i].path for i in fresh], known).items():
        v = todo[fresh[a]]
        out[fresh[a]] = replace(
            v, problem=("duplicate", f"{v.path} has the content of {name}, already mined into this corpus")
        )
    return out


def mine_corpus(
    videos: str | Path,
    out: str | Path,
    miner: MinerConfig,
    *,
    shard: int = 0,
    num_shards: int = 1,
    workers: int | None = None,
    retry_failures: bool = False,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
    progress: bool = True,
    miner_factory: MinerFactory = VideoMiner,
) -> RunSummary:
    """Mine the videos of shard `shard`/`num_shards` of `videos` into the corpus `out`, skipping
    those already done, with `workers` processes (None: one per core; 0: in this process). Never
    raises for a bad video; raises InputError for a bad `videos=`. `miner_factory` builds each
    worker's miner from the config (VideoMiner; a subclass can change the per-video work)."""
    listed = select_shard(list_videos(videos, extensions), shard, num_shards)
    root = init_corpus(out)
    check_settings(root, miner.corpus_settings())
    done = _done_keys(root, retry_failures)
    todo = _flag_mined_copies(root, [v for v in listed if v.key not in done])
    summary = RunSummary()
    summary.run.update(videos_listed=len(listed), videos_skipped_done=len(listed) - len(todo))
    workers = usable_cores() if workers is None else workers
    workers = min(workers, len(todo) or 1)
    log.info(
        "mining %d videos (%d already done) into %s with %d workers", len(todo), len(listed) - len(todo), root, workers
    )
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="video", desc="mining", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    with bar:
        refused = (_refused(root, v) for v in todo if v.problem is not None)
        for outcome in chain(
            refused, _outcomes([v for v in todo if v.problem is None], miner, root, workers, miner_factory)
        ):
            summary.run["videos_mined" if outcome.ok else "videos_failed"] += 1
            summary.run.update(outcome.stats)
            if not outcome.ok:
                summary.failures[outcome.reason] += 1
                log.warning("skipped %s: %s", outcome.video, outcome.detail)
            bar.update(1)
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                pairs=summary.run["pairs"],
                failed=summary.run["videos_failed"],
                pairs_per_s=f"{summary.run['pairs'] / max(elapsed, 1e-9):.1f}",
                refresh=False,
            )
    summary.corpus = corpus_totals(root)
    write_json(
        root / "summary.json",
        {**summary.corpus, "last_run": dict(summary.run), "last_run_seconds": time.perf_counter() - start},
    )
    return summary
