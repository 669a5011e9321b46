"""Verify a corpus file by file, and repair it by removing what is damaged so it is mined again.

`python mine.py out=<corpus> verify=true` reads the corpus's settings (mining.json), every
manifest, shard, done mark and failure record, checks every JPEG (CRC32 where the manifest has it,
then a strict decode), prints a table of the damage by video and exits non-zero when there is any.

`verify=repair` keeps what is intact: a video whose only damage is some of its JPEGs keeps its
other pairs (its manifest and done mark are rewritten without the damaged ones, which are counted
in repaired.json and summary.json's `pairs_lost_to_repair`, so that training on the corpus warns
with the count). A video with damage of any other kind (a missing, truncated or unreadable file,
counts that disagree, every pair damaged) has all its files removed (shard, manifest, done mark,
failure record): the next `python mine.py videos=<the same videos> out=<corpus>` mines exactly
those videos again, since a video is skipped only when it has a done or failure mark.
summary.json's totals are rewritten either way.

Everything is keyed by the video's key, the file stem that mine.py gives its shard, manifest and
marks (shards/<key>.tar, manifest/<key>.parquet, videos/<key>.parquet, failures/<key>.parquet).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vidrep.common.io import atomic_write, write_json
from vidrep.data.corpus import REPAIRED, SCHEMA, _committed, verify_command


@dataclass
class VideoDamage:
    key: str
    video: str = ""
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bad_pairs: list[str] = field(default_factory=list)  # pair ids whose JPEGs are damaged
    keep_intact: bool = False  # only some JPEGs damaged: repair keeps the other pairs
    jpeg_lines: int = 0  # how many of `problems` are about damaged JPEGs

    def add(self, problem: str, path: Path) -> None:
        self.problems.append(problem)
        if str(path) not in self.files:
            self.files.append(str(path))


def _decodes(jpeg: bytes) -> bool:
    """A strict decode: Pillow raises on the corrupt entropy data that OpenCV's libjpeg only warns
    about (and returns with wrong pixels)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - every decoder error means the same here
        return False


def _read_table(path: Path, damage: VideoDamage, what: str, schema=None):
    if path.stat().st_size == 0:
        damage.add(f"{what} is 0 bytes", path)
        return None
    try:
        return pq.read_table(path, schema=schema)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        damage.add(f"{what} unreadable ({type(e).__name__})", path)
        return None


def _check_shard(root: Path, table, damage: VideoDamage, decode: bool) -> int:
    """Damaged JPEGs of one manifest's rows; returns the number of rows checked."""
    rows = table.to_pylist()
    fds: dict[str, int] = {}
    bad = 0
    try:
        for r in rows:
            path = root / "shards" / r["shard"]
            if r["shard"] not in fds:
                if not path.is_file():
                    damage.add("shard missing", path)
                    return len(rows)
                fds[r["shard"]] = os.open(path, os.O_RDONLY)
            for kind in ("query", "tracked"):
                data = os.pread(fds[r["shard"]], r[f"{kind}_size"], r[f"{kind}_offset"])
                crc = r.get(f"{kind}_crc32")
                if len(data) != r[f"{kind}_size"]:
                    damage.add(f"shard truncated at byte {r[f'{kind}_offset'] + len(data)}", path)
                    return len(rows)
                if (crc is not None and zlib.crc32(data) != crc) or (decode and not _decodes(data)):
                    bad += 1
                    if r["pair_id"] not in damage.bad_pairs:
                        damage.bad_pairs.append(r["pair_id"])
                    if bad <= 3:
                        damage.jpeg_lines += 1
                        damage.add(
                            f"pair {r['pair_id']}: {kind} JPEG "
                            + ("fails its CRC32" if crc is not None and zlib.crc32(data) != crc else "does not decode"),
                            path,
                        )
        if bad > 3:
            damage.jpeg_lines += 1
            damage.problems.append(f"... {bad} damaged JPEGs in all")
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(rows)


def verify_video(root: str | Path, key: str, decode: bool = True) -> VideoDamage:
    """Everything stored for one video key, checked; an empty `problems` means intact."""
    root = Path(root)
    damage = VideoDamage(key)
    manifest, done, failed = (root / d / f"{key}.parquet" for d in ("manifest", "videos", "failures"))
    pairs = None
    if manifest.is_file():
        table = _read_table(manifest, damage, "manifest", SCHEMA)
        if table is not None:
            damage.video = table.column("video")[0].as_py() if table.num_rows else ""
            pairs = _check_shard(root, table, damage, decode)
    if done.is_file():
        table = _read_table(done, damage, "done mark", None)
        if table is not None:
            row = table.to_pylist()[0] if table.num_rows == 1 else None
            if row is None:
                damage.add(f"done mark holds {table.num_rows} rows, not 1", done)
            else:
                damage.video = damage.video or row.get("video", "")
                counted = int(row.get("pairs") or 0)
                if counted and pairs is None and not manifest.is_file():
                    damage.add(f"manifest missing (the done mark counts {counted} pairs)", manifest)
                elif pairs is not None and counted != pairs:
                    damage.add(f"manifest holds {pairs} pairs, the done mark counts {counted}", manifest)
    if failed.is_file():
        table = _read_table(failed, damage, "failure record", None)
        if table is not None and table.num_rows:
            damage.video = damage.video or table.column("video")[0].as_py()
    jpegs_only = len(damage.problems) == damage.jpeg_lines
    if damage.problems and jpegs_only and done.is_file() and pairs is not None and len(damage.bad_pairs) < pairs:
        damage.keep_intact = True
        damage.files = [str(manifest), str(done)]  # rewritten without the damaged pairs
    elif damage.problems:
        # everything of the video goes, so that it is mined again from scratch
        damage.bad_pairs = []
        for path in (root / "shards" / f"{key}.tar", manifest, done, failed):
            if path.exists() and str(path) not in damage.files:
                damage.files.append(str(path))
    return damage


def corpus_keys(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted({Path(f).stem for d in ("manifest", "videos", "failures") for f in _committed(root / d)})


def _verify_args(args: tuple[str, str, bool]) -> VideoDamage:
    return verify_video(*args)


def verify_corpus(root: str | Path, decode: bool = True, workers: int = 1) -> list[VideoDamage]:
    """The damaged videos of a corpus (an empty list: all intact), in key order."""
    root = Path(root)
    if not (root / "manifest").is_dir() and not (root / "videos").is_dir():
        raise FileNotFoundError(f"{root} is not a vidrep corpus (no manifest/ or videos/ folder); check out=")
    jobs = [(str(root), key, decode) for key in corpus_keys(root)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results: Iterable[VideoDamage] = list(pool.map(_verify_args, jobs, chunksize=64))
    else:
        results = map(_verify_args, jobs)
    return _corpus_files(root) + [d for d in results if d.problems]


CORPUS_LEVEL = "(corpus)"


def _corpus_files(root: Path) -> list[VideoDamage]:
    """The corpus's own files that do not read (mining.json, summary.json): repair cannot rebuild
    mining.json (the settings are known only to whoever mined), so its line says what to do."""
    from vidrep.data.corpus import DamagedCorpusError, read_settings

    out = []
    settings = root / "mining.json"
    if settings.is_file():
        try:
            read_settings(settings)
        except DamagedCorpusError as e:
            out.append(VideoDamage(CORPUS_LEVEL, "mining.json", [str(e)]))
    summary = root / "summary.json"
    if summary.is_file():
        try:
            json.loads(summary.read_text())
        except (ValueError, UnicodeDecodeError):
            # verify=repair rewrites it from the done marks
            out.append(VideoDamage(CORPUS_LEVEL, "summary.json", [f"{summary} is not valid JSON"], [str(summary)]))
    return out


def damage_table(root: str | Path, damaged: list[VideoDamage]) -> str:
    if not damaged:
        return f"corpus {root}: no damage found"
    lines = [f"corpus {root}: {len(damaged)} damaged video(s)", f"{'key':16}  {'video':30}  problems / files"]
    for d in damaged:
        lines.append(f"{d.key:16}  {d.video[:30]:30}  {'; '.join(d.problems)}")
        lines.extend(f"{'':16}  {'':30}  {f}" for f in d.files)
    lines.append(
        f"repair: `{verify_command(root, 'repair')}` removes these videos' files; then rerun "
        f"`python mine.py videos=<the same videos> out={root}` to mine exactly them again"
    )
    return "\n".join(lines)


def _drop_pairs(root: Path, d: VideoDamage) -> int:
    """Rewrite a video's manifest and done mark without its damaged pairs (manifest first: a repair
    killed between the two leaves counts that disagree, which the next verify removes whole);
    returns the pairs dropped. The shard keeps their bytes, which no manifest row points at."""
    manifest, done = root / "manifest" / f"{d.key}.parquet", root / "videos" / f"{d.key}.parquet"
    table = pq.read_table(manifest, schema=SCHEMA)
    bad = set(d.bad_pairs)
    keep = table.filter(pa.array([p not in bad for p in table.column("pair_id").to_pylist()]))
    atomic_write(manifest, lambda f: pq.write_table(keep, f))
    row = pq.read_table(done).to_pylist()[0]
    row["pairs"] = keep.num_rows
    mark = pa.Table.from_pylist([row], schema=pq.read_schema(done))
    atomic_write(done, lambda f: pq.write_table(mark, f))
    return table.num_rows - keep.num_rows


def repair_corpus(root: str | Path, damaged: list[VideoDamage]) -> list[str]:
    """Keep the intact pairs of the videos with only some JPEGs damaged (their loss counted in
    repaired.json); remove every file of the other damaged videos (done marks last: a repair killed
    midway is redone by the next verify); rewrite summary.json's totals. Returns the paths removed
    or rewritten."""
    from vidrep.mining.run import corpus_totals  # run imports nothing of verify: no cycle

    root = Path(root)
    removed = []
    ledger_path = root / REPAIRED
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    for d in damaged:
        if d.key == CORPUS_LEVEL:  # summary.json is rewritten below; mining.json needs its owner
            continue
        if d.keep_intact:
            lost = _drop_pairs(root, d)
            entry = ledger.setdefault(d.key, {"video": d.video, "pairs_lost": 0})
            entry["pairs_lost"] += lost
            write_json(ledger_path, ledger)
            removed += d.files
            continue
        paths = sorted((Path(f) for f in d.files), key=lambda p: p.parent.name in ("videos", "failures"))
        for p in paths:
            if p.exists():
                p.unlink()
                removed.append(str(p))
    summary = root / "summary.json"
    totals = corpus_totals(root)
    write_json(summary, {**totals, "repaired_videos": [d.key for d in damaged if d.key != CORPUS_LEVEL]})
    return removed
