"""One video, one identity: inputs that are not regular files, and the same file or the same content
listed under several names, are found before mining and recorded in failures/ instead of mined;
so is a byte copy of a video that an earlier run already mined into the same corpus (each done
mark records its video's size and content hash, `CONTENT_COLUMNS`).

A video listed twice (a symlink in the folder; `a/x.avi`, `./a/x.avi` and an absolute path in a list)
would otherwise give byte-identical pairs under different video ids, which can land in both the
training and the validation split. FIFOs, devices and symlink loops are never opened: reading a FIFO
blocks forever.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

MIB = 1 << 20


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be mined without opening it (None: a regular file, or missing, which the
    miner records itself), from os.stat alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symlink loop; point the link at a video file"
        return f"{path} cannot be inspected ({e.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "a folder"
        if stat.S_ISDIR(st.st_mode)
        else "not a regular file"
    )
    return f"{path} is {kind}, not a video file; it was not opened (reading a FIFO would block)"


def _ends_hash(path: Path, size: int) -> bytes:
    """A hash of the size, the first and the last MiB: equal for equal files, rarely for others."""
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if size > MIB:
            f.seek(max(MIB, size - MIB))
            h.update(f.read(MIB))
    return h.digest()


def _full_hash(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.digest()


def find_duplicates(paths: Sequence[Path]) -> dict[int, int]:
    """{index of a duplicate: index of its original} for inputs given in order (the first listed is
    the original): the same real path, or the same content (size, then a hash of the first and last
    MiB, then a full hash on a match). Missing, empty and non-regular files are left out (the miner
    or `not_a_file` records them). Reads only files whose size collides with another's."""
    dup: dict[int, int] = {}
    by_real: dict[str, int] = {}
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            continue
        real = os.path.realpath(p)
        if real in by_real:
            dup[i] = by_real[real]
            continue
        by_real[real] = i
        by_size[st.st_size].append(i)
    for size, same_size in by_size.items():
        if len(same_size) < 2:
            continue
        by_ends: dict[bytes, list[int]] = defaultdict(list)
        for i in same_size:
            by_ends[_ends_hash(paths[i], size)].append(i)
        for group in by_ends.values():
            if len(group) < 2:
                continue
            first: dict[bytes, int] = {}
            for i in group:
                full = _full_hash(paths[i]) if size > 2 * MIB else b""  # <= 2 MiB: the ends hash read it all
                if full in first:
                    dup[i] = first[full]
                else:
                    first[full] = i
    return dup


# The done mark's record of a video's content (null in corpora mined before it: those videos are
# not matched across runs).
CONTENT_COLUMNS = {"content_size": "int64", "content_blake2b": "string"}


def content_id(path: Path) -> dict:
    """The done mark's content columns for `path`: its size and the blake2b of all its bytes (one
    sequential read, small next to decoding it); none when it cannot be read (an all-null column
    would get parquet's null type, which the other marks' int64 cannot be read into)."""
    try:
        return {"content_size": os.stat(path).st_size, "content_blake2b": _full_hash(path).hex()}
    except OSError:
        return {}


def mined_content(done_marks: Sequence[str]) -> dict[int, dict[str, str]]:
    """{size: {content hash: video name}} of the videos a corpus already holds, from its done
    marks (only the two content columns and the name are read)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not done_marks:
        return {}
    schema = pa.schema([("video", pa.string()), *((k, getattr(pa, t)()) for k, t in CONTENT_COLUMNS.items())])
    table = ds.dataset(list(done_marks), schema=schema, format="parquet").to_table()
    known: dict[int, dict[str, str]] = defaultdict(dict)
    for video, size, digest in zip(*(table.column(c).to_pylist() for c in schema.names)):
        if size is not None and digest is not None:
            known[size].setdefault(digest, video)
    return known


def find_mined_copies(paths: Sequence[Path], known: dict[int, dict[str, str]]) -> dict[int, str]:
    """{index of an input: the name it was mined under} for inputs whose content a corpus already
    holds (`known`, from `mined_content`). Reads only the files whose size matches a mined one."""
    out: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            size = os.stat(p).st_size
        except OSError:
            continue
        if size in known:
            try:
                video = known[size].get(_full_hash(p).hex())
            except OSError:
                continue
            if video is not None:
                out[i] = video
    return out
