"""Which videos to mine: a folder (searched recursively) or a list file, and a shard of them."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vidrep.data.corpus import video_id_for
from vidrep.mining.identity import find_duplicates, not_a_file

VIDEO_EXTENSIONS = (
    ".mp4",
    ".avi",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
    ".3gp",
    ".ts",
    ".ogv",
)


class InputError(ValueError):
    """The `videos=` input is missing or lists nothing; the message says what was looked at."""


@dataclass(frozen=True)
class VideoInput:
    """`name` is the video's identity in the corpus (path relative to the folder, or the line of the
    list file), so ids agree across machines that mount the videos in different places."""

    name: str
    path: Path
    # (reason, detail) when the input is recorded in failures/ without being mined: not_a_file, duplicate
    problem: tuple[str, str] | None = None

    @property
    def video_id(self) -> int:
        return video_id_for(self.name)

    @property
    def key(self) -> str:
        """The video's file name stem in the corpus (shards/, manifest/, videos/, failures/)."""
        return f"{self.video_id:016x}"


def list_videos(source: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoInput]:
    """Videos of a folder (files with one of `extensions`, recursively) or of a list file (one path
    per line, relative ones resolved against the list's folder; blank lines and # comments skipped),
    sorted by name. Every line of a list is taken, whatever its extension: what cannot be decoded is
    recorded as a failure, not silently dropped."""
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError(
            f"videos={source} does not exist; pass a folder of videos or a text file listing one video path per line"
        )
    if not source.is_dir() and not stat.S_ISREG(os.stat(source).st_mode):
        raise InputError(
            f"videos={source} is not a folder or a regular file (a FIFO or a device?); it was not read. "
            "Pass a folder of videos or a text file listing one video path per line"
        )
    if source.is_dir():
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        videos = [
            VideoInput(p.relative_to(source).as_posix(), p)
            for p in source.rglob("*")
            if p.suffix.lower() in exts
            and not p.is_dir()
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
        what = f"folder {source} holds no file ending in {', '.join(sorted(exts))}"
    else:
        lines = source.read_text(errors="replace").splitlines()
        names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        videos = [
            VideoInput(n, Path(n).expanduser() if Path(n).expanduser().is_absolute() else source.parent / n)
            for n in names
        ]
        what = f"list file {source} names no video (one path per line)"
    if not videos:
        raise InputError(f"videos={source}: {what}")
    unique = sorted({v.name: v for v in videos}.values(), key=lambda v: v.name)
    return flag_problems(unique)


def flag_problems(videos: Sequence[VideoInput]) -> list[VideoInput]:
    """The inputs, with `problem` set on those that must not be mined: not regular files (never
    opened), and duplicates (the same real path or content as an input earlier in the list)."""
    out = []
    for v in videos:
        why = not_a_file(v.path)
        out.append(replace(v, problem=("not_a_file", why)) if why else v)
    ok = [i for i, v in enumerate(out) if v.problem is None]
    for a, b in find_duplicates([out[i].path for i in ok]).items():
        i, original = ok[a], out[ok[b]]
        out[i] = replace(
            out[i],
            problem=(
                "duplicate",
                f"{out[i].path} has the content of {original.name} ({original.path}), mined under that name",
            ),
        )
    return out


def select_shard(videos: Sequence[VideoInput], shard: int, num_shards: int) -> list[VideoInput]:
    """The videos of shard `shard` of `num_shards`: by video id, so a video's shard does not
    change when others are added to the folder."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise InputError(f"need 0 <= shard < num_shards; got shard={shard} num_shards={num_shards}")
    return [v for v in videos if v.video_id % num_shards == shard]
