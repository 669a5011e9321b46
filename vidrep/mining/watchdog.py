"""A time limit per video: a video whose decoder hangs (rather than crashes) must not stall its
worker for ever, and at 100K web videos some will.

Each worker reports, once per video, which video it started and when, with the limit that applies
to it (`miner.video_timeout`, or one derived from the length the container declares); the parent
polls these reports about once a second and kills the worker process of a video past its limit.
Nothing runs per frame. Reports are one small file per worker process, written atomically by that
worker alone: no lock is shared with a process that may be killed at any instant (a killed holder
of a multiprocessing.Queue's lock would block every other worker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The derived limit: a video's frames at a frame rate far below any measured (bench/mine.py: 100-300
# frames/s per core at 600x448, 720p H.264 included), never under the floor (process start-up,
# a slow disk), and a generous fixed limit when the container does not declare its length.
TIMEOUT_FPS = 5.0
TIMEOUT_FLOOR_S = 300.0
TIMEOUT_UNKNOWN_LENGTH_S = 3600.0
POLL_S = 1.0


def default_timeout(frames: int | None) -> float:
    """Seconds allowed for a video of `frames` frames (None: length unknown)."""
    if frames is None or frames <= 0:
        return TIMEOUT_UNKNOWN_LENGTH_S
    return max(TIMEOUT_FLOOR_S, frames / TIMEOUT_FPS)


def declared_frames(path: str | Path) -> int | None:
    """The frame count the container declares (or duration x rate), read from its header without
    decoding; None when it declares neither or cannot be opened (the miner then reports why)."""
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = stream.average_rate or stream.guessed_rate
            if container.duration and rate:
                return int(container.duration / 1e6 * float(rate))
    except Exception:  # noqa: BLE001 - a probe only; mining the file reports what is wrong with it
        return None
    return None


@dataclass(frozen=True)
class Started:
    key: str
    pid: int
    start: float
    limit: float

    @property
    def deadline(self) -> float:
        return self.start + self.limit


def report_started(folder: str | Path, key: str, start: float, limit: float) -> None:
    """Called by a worker when it starts a video (again once its limit is known)."""
    path = Path(folder) / f"{os.getpid()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "pid": os.getpid(), "start": start, "limit": limit}))
    os.replace(tmp, path)


class Watchdog:
    """The parent's side: reads the workers' reports and kills the worker of an overdue video."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vidrep-watchdog-"))
        self.killed: dict[str, float] = {}  # video key -> the limit it exceeded

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def forget_workers(self) -> None:
        """Drop every report: called once a pool has ended, so that a video requeued from it is
        not judged by (nor its pid confused with) a process that no longer exists."""
        for path in self.folder.glob("*.json"):
            path.unlink(missing_ok=True)

    def started(self) -> dict[str, Started]:
        out = {}
        for path in self.folder.glob("*.json"):
            try:
                s = Started(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # replaced while read; the next poll sees it
            out[s.key] = s
        return out

    def kill_overdue(self, keys: set[str], now: float | None = None) -> list[str]:
        """Kill the worker of every video in `keys` past its limit; returns their keys. The pool
        then breaks, and the caller records these videos as `timeout`."""
        now = time.time() if now is None else now
        late = [s for k, s in self.started().items() if k in keys and now > s.deadline and k not in self.killed]
        for s in late:
            try:
                os.kill(s.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended meanwhile; its pool reports how
            self.killed[s.key] = s.limit
            (self.folder / f"{s.pid}.json").unlink(missing_ok=True)
        return [s.key for s in late]
