"""The corpus format: the one place where mine.py (writer) and train.py (reader) meet.

    <root>/corpus.json            format name and version
    <root>/shards/<name>.tar      WebDataset-layout tar: <pair_id>.query.jpg, <pair_id>.tracked.jpg
    <root>/manifest/<name>.parquet one row per pair of that shard (MANIFEST_COLUMNS + where its
                                   two JPEGs lie in the tar, STORAGE_COLUMNS)
    <root>/videos/<name>.parquet   one row per mined video: its counters (written last: the video
                                   is done when this appears)
    <root>/failures/<name>.parquet one row per video that could not be mined: video, reason, detail
    <root>/mining.json             the miner's settings; summary.json the totals of the last run
    <root>/repaired.json           pairs that `verify=repair` removed, by video (their JPEGs were
                                   damaged; the video's other pairs were kept)

Each JPEG's CRC32 is in the manifest (query_crc32, tracked_crc32; null in corpora mined before
they existed, which still read): readers check it, `python mine.py out=<root> verify=true` checks
everything and `verify=repair` removes what is damaged so that the next mine.py run re-mines it.

num_points counts the points of the query frame that could be followed, num_moving the moving
points inside the query window.

A shard is committed when its manifest appears: the tar is renamed into place first, then the
manifest, each written under a dot-prefixed temporary name. Readers only see shards that have a
manifest, so an interrupted writer leaves nothing half-visible, and independent jobs add shards
to one corpus without coordination as long as their shard names differ (mine.py names shards
after the videos they hold). Identifiers are derived from the data (a hash of the video path and
the query frame), never from a counter, so they agree across jobs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from vidrep.common.io import atomic_write, write_json

FORMAT = {"format": "vidrep-corpus", "version": 1}
REPAIRED = "repaired.json"
MANIFEST_COLUMNS = (
    "pair_id",
    "video",
    "video_id",
    "query_frame",
    "tracked_frame",
    "query_box",
    "tracked_box",
    "num_points",
    "num_moving",
)
STORAGE_COLUMNS = (
    "shard",
    "query_offset",
    "query_size",
    "tracked_offset",
    "tracked_size",
    "query_crc32",
    "tracked_crc32",
)
SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("video", pa.string()),
        ("video_id", pa.int64()),
        ("query_frame", pa.int32()),
        ("tracked_frame", pa.int32()),
        ("query_box", pa.list_(pa.int32(), 4)),
        ("tracked_box", pa.list_(pa.int32(), 4)),
        ("num_points", pa.int32()),
        ("num_moving", pa.int32()),
        ("shard", pa.string()),
        ("query_offset", pa.int64()),
        ("query_size", pa.int32()),
        ("tracked_offset", pa.int64()),
        ("tracked_size", pa.int32()),
        ("query_crc32", pa.int64()),  # zlib.crc32 of the JPEG bytes; null in corpora mined before it
        ("tracked_crc32", pa.int64()),
    ]
)


class CorpusError(RuntimeError):
    """A corpus is missing, empty or inconsistent; the message names the path and the fix."""


class DamagedCorpusError(CorpusError):
    """Part of a corpus is damaged; the message names the file and the verify/repair command."""


def verify_command(root: str | Path, mode: str = "true") -> str:
    return f"python mine.py out={root} verify={mode}"


def damage_advice(root: str | Path) -> str:
    return (
        f"run `{verify_command(root)}` to list the damage, then `{verify_command(root, 'repair')}` and rerun "
        f"`python mine.py videos=<the same videos> out={root}` to re-mine exactly the damaged videos"
    )


def video_id_for(video: str) -> int:
    """A stable non-negative int64 id for a video path, the same in every job and process."""
    digest = hashlib.blake2b(video.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def pair_id_for(video_id: int, query_frame: int) -> str:
    # No dots: WebDataset splits a member's key from its extension at the first dot.
    return f"{video_id:016x}_{query_frame:07d}"


@dataclass(frozen=True)
class PairRecord:
    """One mined pair: provenance (boxes are x, y, w, h in the resized frame) and its two JPEGs."""

    video: str
    query_frame: int
    tracked_frame: int
    query_box: Sequence[int]
    tracked_box: Sequence[int]
    num_points: int
    num_moving: int
    query_jpeg: bytes
    tracked_jpeg: bytes

    @property
    def video_id(self) -> int:
        return video_id_for(self.video)

    @property
    def pair_id(self) -> str:
        return pair_id_for(self.video_id, self.query_frame)


def init_corpus(root: str | Path) -> Path:
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "manifest").mkdir(parents=True, exist_ok=True)
    info = root / "corpus.json"
    if not info.exists():
        write_json(info, FORMAT)
    return root


def write_shard(root: str | Path, name: str, records: Iterable[PairRecord]) -> Path:
    """Write one shard and its manifest atomically; rewriting a name replaces it. Returns the tar."""
    if not name or name.startswith(".") or "/" in name:
        raise ValueError(f"shard name {name!r} must be a plain file name not starting with '.'")
    root = init_corpus(root)
    records = list(records)
    tar_path = root / "shards" / f"{name}.tar"

    def write_tar(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r in records:
                for kind, data in (("query", r.query_jpeg), ("tracked", r.tracked_jpeg)):
                    info = tarfile.TarInfo(f"{r.pair_id}.{kind}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    atomic_write(tar_path, write_tar)
    with tarfile.open(tar_path) as tar:
        where = {m.name: (m.offset_data, m.size) for m in tar}
    columns = {c: [] for c in SCHEMA.names}
    for r in records:
        q_off, q_size = where[f"{r.pair_id}.query.jpg"]
        t_off, t_size = where[f"{r.pair_id}.tracked.jpg"]
        row = dict(
            pair_id=r.pair_id,
            video=r.video,
            video_id=r.video_id,
            query_frame=r.query_frame,
            tracked_frame=r.tracked_frame,
            query_box=list(r.query_box),
            tracked_box=list(r.tracked_box),
            num_points=r.num_points,
            num_moving=r.num_moving,
            shard=tar_path.name,
            query_offset=q_off,
            query_size=q_size,
            tracked_offset=t_off,
            tracked_size=t_size,
            query_crc32=zlib.crc32(r.query_jpeg),
            tracked_crc32=zlib.crc32(r.tracked_jpeg),
        )
        for c in SCHEMA.names:
            columns[c].append(row[c])
    table = pa.table(columns, schema=SCHEMA)
    atomic_write(root / "manifest" / f"{name}.parquet", lambda f: pq.write_table(table, f))
    return tar_path


def read_settings(path: Path) -> dict:
    """A corpus's mining.json; DamagedCorpusError naming it when it is not a JSON object (truncated
    by a full disk, overwritten)."""
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        stored = e
    if not isinstance(stored, dict):
        what = f"not valid JSON: {stored}" if isinstance(stored, Exception) else "not a JSON object"
        raise DamagedCorpusError(
            f"corpus {path.parent}: {path} is damaged ({what}); it records the settings the corpus was mined with. "
            f"Restore it from a copy, or, if you know the corpus was mined with mine.py's current settings, delete "
            f"it and rerun mine.py over the same videos (the run writes its settings there again); "
            f"`{verify_command(path.parent)}` checks the rest"
        )
    return stored


def check_settings(root: str | Path, settings: dict, filename: str = "mining.json") -> None:
    """Record the settings a corpus is mined with, or fail when it was mined with others: pairs
    mined under different settings must not mix silently."""
    path = init_corpus(root) / filename
    if path.exists():
        stored = read_settings(path)
        if stored != settings:
            diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise CorpusError(
                f"corpus {root} was mined with other settings "
                f"({', '.join(f'{k}: {stored.get(k)!r} there, {settings.get(k)!r} now' for k in diff)}); "
                f"mine into a new out= folder, or rerun with the stored settings from {path}"
            )
    else:
        write_json(path, settings)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda f: pq.write_table(table, f))


def write_video_record(root: str | Path, name: str, row: dict) -> None:
    """Mark one video done, with its counters; the last write of a video's commit."""
    _write_rows(Path(root) / "videos" / f"{name}.parquet", [row])
    (Path(root) / "failures" / f"{name}.parquet").unlink(missing_ok=True)


def write_failure(root: str | Path, name: str, row: dict) -> None:
    _write_rows(Path(root) / "failures" / f"{name}.parquet", [row])


def _committed(folder: Path) -> list[str]:
    """The parquet files of a folder that are committed (not dot-prefixed temporaries), sorted."""
    return sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def _unreadable(files: list[str]) -> list[str]:
    """The parquet files among `files` whose footer cannot be read (0 bytes, truncated, overwritten)."""
    bad = []
    for f in files:
        try:
            pq.read_metadata(f)
        except Exception:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            bad.append(f)
    return bad


def _read_parquets(root: Path, files: list[str], schema: pa.Schema | None = None) -> pa.Table:
    try:
        return ds.dataset(files, schema=schema, format="parquet").to_table()
    except Exception as e:  # noqa: BLE001
        bad = _unreadable(files)
        if not bad:
            raise
        raise DamagedCorpusError(
            f"corpus {root}: {len(bad)} damaged file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            f"({type(e).__name__}); {damage_advice(root)}"
        ) from None


def read_records(root: str | Path, kind: str) -> pa.Table | None:
    """All rows of videos/ or failures/ (None when there are none)."""
    files = _committed(Path(root) / kind)
    return _read_parquets(Path(root), files) if files else None


def read_manifest(root: str | Path) -> pa.Table:
    """All committed pairs of a corpus, duplicates (the same pair in two shards) dropped."""
    root = Path(root)
    if not (root / "manifest").is_dir():
        raise CorpusError(
            f"{root} is not a vidrep corpus (no manifest/ folder); mine one with "
            f"`python mine.py videos=... out={root}` or point data.root at an existing corpus"
        )
    files = _committed(root / "manifest")
    if not files:
        raise CorpusError(f"corpus {root} has no committed shards (manifest/*.parquet is empty)")
    # A dataset reads the files on several threads: a corpus mined per video has ~100K of them.
    table = _read_parquets(root, files, SCHEMA)
    ids = table.column("pair_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        warnings.warn(
            f"corpus {root}: {len(ids) - len(first)} duplicate pairs (same pair_id in two shards) ignored", stacklevel=2
        )
        table = table.take(np.sort(first))
    return table


def check_complete(root: str | Path, num_pairs: int) -> None:
    """Fail when the manifests hold fewer pairs than summary.json counts (a manifest was lost):
    training would otherwise run on fewer pairs without a word."""
    summary = Path(root) / "summary.json"
    if not summary.is_file():
        return
    try:
        totals = json.loads(summary.read_text())
        counted, lost = int(totals.get("pairs", 0)), int(totals.get("pairs_lost_to_repair", 0))
    except (ValueError, TypeError, AttributeError):
        raise DamagedCorpusError(f"corpus {root}: {summary} is damaged; {damage_advice(root)}") from None
    if lost:
        warnings.warn(
            f"corpus {root}: {lost:,} pairs were removed by `verify=repair` (damaged JPEGs; their videos' other "
            f"pairs kept), so it trains on {num_pairs:,} of {num_pairs + lost:,} mined pairs; {Path(root) / REPAIRED} "
            "lists them by video. To get them back, mine those videos into a new corpus and add it to data.root",
            stacklevel=2,
        )
    if num_pairs < counted:
        raise DamagedCorpusError(
            f"corpus {root}: its manifests hold {num_pairs:,} pairs but summary.json counts {counted:,} "
            f"(manifest files lost or damaged); {damage_advice(root)}"
        )


def _spread(rank: np.ndarray) -> np.ndarray:
    """A low-discrepancy value in [0, 1) per rank: any prefix of ranks spreads evenly over [0, 1)."""
    return np.mod(rank * 0.6180339887498949, 1.0)


@dataclass(frozen=True)
class Selection:
    train: np.ndarray  # row indices into the manifest
    val: np.ndarray


def select_pairs(
    video_ids: np.ndarray, query_frames: np.ndarray, num_pairs: int | None, val_fraction: float, seed: int
) -> Selection:
    """Deterministically choose `num_pairs` training pairs, and the validation videos on top.

    Videos are ordered by a seeded permutation and taken whole in that order (the last training
    video cut short), so for one corpus and seed a smaller selection is a subset of a larger one.
    A video goes to validation when its place in that order falls in a `val_fraction` share
    (spread evenly); the validation videos are those met before the training pairs are complete,
    so they are also in every larger selection, and their pairs come on top of `num_pairs`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    videos, inverse = np.unique(video_ids, return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(videos))
    order = np.lexsort((query_frames, rank[inverse]))
    is_val = _spread(rank[inverse[order]]) < val_fraction
    if num_pairs is not None:
        train_so_far = np.cumsum(~is_val)
        if num_pairs > train_so_far[-1]:
            raise CorpusError(
                f"asked for {num_pairs:,} training pairs ({2 * num_pairs:,} patches) but the corpus holds "
                f"{len(order):,} "
                f"pairs: {train_so_far[-1]:,} in training videos and {len(order) - train_so_far[-1]:,} in the "
                f"validation videos (val_fraction={val_fraction}); mine more videos or lower data.num_patches"
            )
        end = int(np.searchsorted(train_so_far, num_pairs)) + 1
        order, is_val = order[:end], is_val[:end]
    return Selection(train=order[~is_val], val=order[is_val])


def check_split(video_ids: np.ndarray, sel: Selection, where: str, val_fraction: float) -> None:
    """Splits that would train or validate on nothing: every negative comes from another video,
    so a training set of one video gives no negatives (a loss of 0 from the first step), and a
    validation split of one video measures nothing."""
    train_videos = len(np.unique(video_ids[sel.train]))
    if train_videos < 2:
        raise CorpusError(
            f"corpus {where} gives training pairs of {train_videos} video(s); negatives come from other videos, so "
            "training needs at least 2: mine more videos into it (python mine.py videos=<more videos> out=<corpus>) "
            "or add corpora (data.root='[a,b]')"
        )
    val_videos = len(np.unique(video_ids[sel.val]))
    if val_fraction > 0 and val_videos < 2:
        raise CorpusError(
            f"corpus {where}: data.val_fraction={val_fraction:g} gives a validation split of {val_videos} video(s); "
            "validation needs at least 2 (negatives come from other videos): raise data.val_fraction, or set "
            "data.val_fraction=0 to train without validation"
        )


class ShardReader:
    """Reads JPEG bytes by (shard, offset, size) with positional reads, keeping a few files open.

    Safe across fork: each process opens its own descriptors.
    """

    def __init__(self, shard_dir: str | Path, max_open: int = 64) -> None:
        self.shard_dir = Path(shard_dir)
        self.max_open = max_open
        self._files: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            path = self.shard_dir / shard
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise DamagedCorpusError(
                    f"shard {path} is listed in the manifest but missing; {damage_advice(self.shard_dir.parent)}"
                ) from None
            self._files[shard] = fd
            if len(self._files) > self.max_open:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def read(self, shard: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DamagedCorpusError(
                f"shard {self.shard_dir / shard} is truncated at byte {offset + len(data)}; "
                f"{damage_advice(self.shard_dir.parent)}"
            )
        return data

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:
        return {"shard_dir": self.shard_dir, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class PairIndex:
    """Compact numpy view of a manifest: what a data-loader worker needs to fetch pair i."""

    def __init__(self, root: str | Path, table: pa.Table | None = None) -> None:
        self.root = Path(root)
        table = read_manifest(root) if table is None else table
        shard = table.column("shard").to_numpy(zero_copy_only=False)
        self.shards, self.shard_index = np.unique(shard, return_inverse=True)
        self.shard_index = self.shard_index.astype(np.int32)
        col = lambda name: table.column(name).to_numpy()  # noqa: E731
        self.video_id = col("video_id")
        self.query_frame = col("query_frame")
        self.query_offset, self.query_size = col("query_offset"), col("query_size")
        self.tracked_offset, self.tracked_size = col("tracked_offset"), col("tracked_size")
        # uint32 (8 bytes a pair, not 16); has_crc False where a shard was mined before checksums existed
        self.has_crc = ~table.column("query_crc32").is_null().to_numpy(zero_copy_only=False)
        self.query_crc = table.column("query_crc32").fill_null(0).to_numpy().astype(np.uint32)
        self.tracked_crc = table.column("tracked_crc32").fill_null(0).to_numpy().astype(np.uint32)
        self.reader = ShardReader(self.root / "shards")

    def __len__(self) -> int:
        return len(self.video_id)

    def pair_id(self, i: int) -> str:
        return pair_id_for(int(self.video_id[i]), int(self.query_frame[i]))

    def shard_path(self, i: int) -> Path:
        return self.root / "shards" / self.shards[self.shard_index[i]]

    def damaged(self, i: int, what: str) -> DamagedCorpusError:
        return DamagedCorpusError(
            f"corpus {self.root}: pair {self.pair_id(i)} in shard {self.shard_path(i)} is damaged "
            f"({what}); {damage_advice(self.root)}"
        )

    def read_pair(self, i: int) -> tuple[bytes, bytes]:
        """The pair's two JPEGs, checked against their CRC32 (~1 us per 10 KB patch)."""
        shard = self.shards[self.shard_index[i]]
        query = self.reader.read(shard, int(self.query_offset[i]), int(self.query_size[i]))
        tracked = self.reader.read(shard, int(self.tracked_offset[i]), int(self.tracked_size[i]))
        checked = self.has_crc[i]
        for kind, data, crc in (("query", query, self.query_crc[i]), ("tracked", tracked, self.tracked_crc[i])):
            if checked and zlib.crc32(data) != crc:
                raise self.damaged(i, f"its {kind} JPEG fails its CRC32 checksum")
            if not checked and not (data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"):
                raise self.damaged(i, f"its {kind} JPEG lacks its start or end marker")
        return query, tracked
