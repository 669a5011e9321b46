"""Several mined corpora read as one: data.root='[/data/a,/data/b]'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vidrep.data.corpus import CorpusError, PairIndex, check_complete, read_manifest, read_settings

# Video ids are hashes of the path as given to mine.py, so two corpora mined from different folders
# can give the same id to different videos (clip001.mp4 in both): corpus i > 0 mixes its ids with
# this odd multiple of i, keeping them distinct from corpus 0's (a collision needs a 64-bit match).
_ID_SALT = 0x9E3779B97F4A7C15


def as_roots(root: str | Path | Sequence[str | Path]) -> list[Path]:
    """data.root as a list of corpus folders (one path, or a list of them)."""
    roots = [root] if root is None or isinstance(root, str | Path) else list(root)
    if not roots or any(r is None or str(r) in ("", "???") for r in roots):
        raise CorpusError(
            "data.root is not set: point it at a mined corpus (or a list of them, data.root='[/data/a,/data/b]'), "
            "e.g. `python train.py data=8M data.root=/data/corpus`"
        )
    return [Path(str(r)).expanduser() for r in roots]


def _salt(i: int) -> int:
    return int(np.array((i * _ID_SALT) % 2**64, dtype=np.uint64).view(np.int64))


def open_index(root: str | Path | Sequence[str | Path]) -> PairIndex:
    """One PairIndex over every corpus in `root`. With several, each manifest's shard names become
    the shards' absolute paths (so one reader serves them all), corpus i > 0's video ids are salted
    (kept distinct), and a pair found in two corpora (same pair_id: the same bytes) is kept once."""
    roots = as_roots(root)
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        raise CorpusError(
            f"data.root {', '.join(missing)} does not exist; mine a corpus there with mine.py or fix the path"
        )
    if len(roots) == 1:
        index = PairIndex(roots[0])
        check_complete(roots[0], len(index))
        return index
    tables = []
    for i, r in enumerate(roots):
        table = read_manifest(r)
        check_complete(r, len(table))
        shard = pc.binary_join_element_wise(pa.scalar(f"{(r / 'shards').resolve()}/"), table["shard"], "")
        table = table.set_column(table.schema.get_field_index("shard"), "shard", shard)
        if i:
            ids = pc.bit_wise_xor(table["video_id"], pa.scalar(_salt(i), pa.int64()))
            table = table.set_column(table.schema.get_field_index("video_id"), "video_id", ids)
        tables.append(table)
    table = pa.concat_tables(tables)
    _, first = np.unique(table.column("pair_id").to_numpy(zero_copy_only=False), return_index=True)
    if len(first) < len(table):
        table = table.take(np.sort(first))
    return PairIndex(roots[0], table)


def corpus_settings(root: str | Path | Sequence[str | Path]) -> dict[str, dict]:
    """Each corpus's mining settings (its mining.json; {} for a corpus without one), by path:
    corpora mined with different settings may be trained on together, and the run records which."""
    out = {}
    for r in as_roots(root):
        path = r / "mining.json"
        out[str(r.resolve())] = read_settings(path) if path.exists() else {}
    return out
