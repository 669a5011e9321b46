import os
import tarfile

import numpy as np
import pytest
import torch

from vidrep.data.corpus import (
    CorpusError,
    PairIndex,
    PairRecord,
    read_manifest,
    select_pairs,
    video_id_for,
    write_shard,
)
from vidrep.data.datamodule import PairDataModule, PairDataset
from vidrep.data.transforms import PatchTransform


def record(video, frame, payload=b"x"):
    return PairRecord(
        video=video,
        query_frame=frame,
        tracked_frame=frame + 30,
        query_box=(1, 2, 227, 227),
        tracked_box=(3, 4, 227, 227),
        num_points=100,
        num_moving=40,
        query_jpeg=payload * 10 + b"q",
        tracked_jpeg=payload * 20 + b"t",
    )


def test_round_trip_and_manifest_columns(tmp_path):
    write_shard(tmp_path, "a", [record("v1.mp4", 0), record("v1.mp4", 40)])
    write_shard(tmp_path, "b", [record("v2.mp4", 5, b"y")])
    table = read_manifest(tmp_path)
    for col in (
        "pair_id",
        "video",
        "video_id",
        "query_frame",
        "tracked_frame",
        "query_box",
        "tracked_box",
        "num_points",
        "num_moving",
    ):
        assert col in table.column_names
    assert table.column("video_id").type.bit_width == 64
    rows = table.to_pylist()
    assert [r["video"] for r in rows] == ["v1.mp4", "v1.mp4", "v2.mp4"]
    assert rows[0]["query_box"] == [1, 2, 227, 227] and rows[0]["video_id"] == video_id_for("v1.mp4")
    index = PairIndex(tmp_path)
    assert index.read_pair(2) == (b"y" * 10 + b"q", b"y" * 20 + b"t")
    # the shard is a plain tar readable by WebDataset tools
    with tarfile.open(tmp_path / "shards" / "a.tar") as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{r['pair_id']}.{k}.jpg" for r in rows[:2] for k in ("query", "tracked")
        )


def test_uncommitted_shards_are_invisible_and_rewrites_replace(tmp_path):
    write_shard(tmp_path, "a", [record("v1.mp4", 0)])
    # a writer killed between the tar and the manifest leaves a tar without a manifest: ignored
    (tmp_path / "shards" / "b.tar").write_bytes(b"partial")
    (tmp_path / "manifest" / ".b.parquet.123.tmp").write_bytes(b"partial")
    assert read_manifest(tmp_path).num_rows == 1
    write_shard(tmp_path, "a", [record("v1.mp4", 0), record("v1.mp4", 31)])
    assert read_manifest(tmp_path).num_rows == 2


def test_independent_writers_and_duplicates(tmp_path):
    for job in range(3):  # three jobs, no coordination, distinct shard names
        write_shard(tmp_path, f"job{job}", [record(f"v{job}.mp4", f) for f in (0, 31)])
    write_shard(tmp_path, "again", [record("v0.mp4", 0)])  # the same pair mined twice
    with pytest.warns(UserWarning, match="duplicate"):
        table = read_manifest(tmp_path)
    assert table.num_rows == 6


def test_missing_corpus_errors_name_the_fix(tmp_path):
    with pytest.raises(CorpusError, match="mine.py"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "manifest").mkdir()
    with pytest.raises(CorpusError, match="no committed shards"):
        read_manifest(tmp_path)


def test_selection_is_deterministic_nested_and_split_by_video():
    rng = np.random.default_rng(0)
    videos = np.repeat(rng.integers(0, 2**62, 400), 10)
    frames = np.tile(np.arange(10) * 31, 400)
    big = select_pairs(videos, frames, 3000, 0.1, seed=0)
    small = select_pairs(videos, frames, 1000, 0.1, seed=0)
    again = select_pairs(videos, frames, 1000, 0.1, seed=0)
    np.testing.assert_array_equal(small.train, again.train)
    assert len(small.train) == 1000 and len(big.train) == 3000  # training pairs; validation videos on top
    assert set(small.train) <= set(big.train) and set(small.val) <= set(big.val)
    assert not set(videos[small.train]) & set(videos[small.val])
    assert 0.05 < len(set(videos[big.val])) / len(set(videos[np.concatenate([big.train, big.val])])) < 0.15
    other = select_pairs(videos, frames, 1000, 0.1, seed=1)
    assert set(other.train) != set(small.train)
    with pytest.raises(CorpusError, match=r"4,000 pairs: 3,\d+ in training videos and \d+ in the validation videos"):
        select_pairs(videos, frames, 3800, 0.1, seed=0)


def test_dataset_items_and_flip(tiny_corpus):
    index = PairIndex(tiny_corpus)
    ds = PairDataset(index, np.arange(4), PatchTransform(input_size=99, flip_p=0.0))
    item = ds[1]
    assert item["anchor"].shape == (3, 99, 99) and item["anchor"].dtype == torch.uint8
    assert item["video_id"].item() == index.video_id[1]
    flipped = PairDataset(index, np.arange(4), PatchTransform(input_size=99, flip_p=1.0))[1]
    torch.testing.assert_close(flipped["anchor"], item["anchor"].flip(-1))


def test_demo_pairs_show_the_same_object(tiny_corpus):
    """Anchor and positive (same object, 30 frames apart) are closer in colour than other videos' patches."""
    index = PairIndex(tiny_corpus)
    ds = PairDataset(index, np.arange(len(index)), PatchTransform(input_size=227, flip_p=0.0))
    items = [ds[i] for i in range(len(ds))]
    anchors, positives = (
        torch.stack([torch.histc(it[k].float(), bins=32, min=0, max=255) / it[k].numel() for it in items])
        for k in ("anchor", "positive")
    )
    videos = torch.tensor([int(it["video_id"]) for it in items])
    distance = torch.cdist(anchors.double(), positives.double(), p=1)  # [query, positive] L1 of histograms
    others = distance.masked_fill(videos[:, None] == videos[None, :], float("inf")).min(dim=1).values
    closer = (distance.diagonal() < others).sum().item()
    assert closer / len(items) > 0.9


def test_ranks_train_the_global_batches_of_one_process():
    """Each global batch is dealt across the ranks (10 on 3: 4 + 3 + 3); the ranks' shares, put
    together, are the batches one process trains, in its order, every epoch."""
    from vidrep.data.datamodule import ResumableSampler
    from vidrep.data.shares import rank_shares

    assert rank_shares(50, 4) == [13, 13, 12, 12] and rank_shares(10, 3) == [4, 3, 3] and rank_shares(8, 1) == [8]
    for epoch in (0, 3):
        one = ResumableSampler(47, 10, seed=5)
        one.set_epoch(epoch)
        reference = list(one)
        assert len(reference) == 4 and all(len(b) == 10 for b in reference)
        assert len({i for b in reference for i in b}) == 40  # 4 whole batches, each pair once
        for world in (2, 3, 4):
            ranks = [ResumableSampler(47, 10, world, rank, seed=5) for rank in range(world)]
            for r in ranks:
                r.set_epoch(epoch)
            shares = [list(r) for r in ranks]
            assert [len(s[0]) for s in shares] == rank_shares(10, world)
            assert [sum(parts, []) for parts in zip(*shares)] == reference
    other = ResumableSampler(47, 10, seed=5)
    other.set_epoch(1)
    assert list(other) != reference  # a new order every epoch


def test_batches_mix_many_videos(tmp_path):
    """Shards hold consecutive pairs of few videos; shuffled batches still span many videos."""
    rng = np.random.default_rng(0)
    videos = np.repeat(np.arange(2000), 20)  # 40K pairs, 20 per video, in shard order
    sel = select_pairs(videos, np.tile(np.arange(20), 2000), None, 0.05, seed=0)
    order = rng.permutation(sel.train)
    per_batch = [len(np.unique(videos[order[i : i + 50]])) for i in range(0, len(order) - 50, 50)]
    assert np.mean(per_batch) > 49  # of 50 pairs


def test_datamodule_errors(tmp_path):
    with pytest.raises(CorpusError, match="data.root"):
        PairDataModule(None)
    dm = PairDataModule(str(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="does not exist"):
        dm.setup()


def test_truncated_shard_is_reported(tmp_path):
    write_shard(tmp_path, "a", [record("v1.mp4", 0)])
    tar = tmp_path / "shards" / "a.tar"
    os.truncate(tar, 600)
    with pytest.raises(CorpusError, match="truncated"):
        PairIndex(tmp_path).read_pair(0)


def test_validation_batches_do_not_depend_on_the_number_of_ranks():
    from vidrep.data.datamodule import BatchShards

    ids = np.repeat(np.arange(6), 4)[:23]  # sorted by video, as select_pairs returns them
    reference = [tuple(b) for b in BatchShards(ids, 5)]
    assert len(reference) == 5 and sorted(i for b in reference for i in b) == list(range(23))
    assert {len(b) for b in reference} <= {4, 5}  # near-equal sizes: no short tail without candidates
    for world in (2, 3, 4, 8):
        shards = [[tuple(b) for b in BatchShards(ids, 5, world, rank)] for rank in range(world)]
        assert sorted(b for s in shards for b in s) == sorted(reference)  # the same batches, each once


def _expected_videos_of_a_uniform_draw(videos: int, per_video: int, batch: int) -> float:
    n = videos * per_video
    absent = np.prod([(n - per_video - i) / (n - i) for i in range(batch)])
    return videos * (1 - absent)


def test_validation_batches_span_many_videos_and_each_has_candidates():
    from vidrep.data.datamodule import BatchShards

    ids = np.repeat(np.arange(100), 40)  # 40 pairs per video, in video order
    batches = [ids[b] for b in BatchShards(ids, 50)]
    per_batch = np.mean([len(np.unique(b)) for b in batches])
    uniform = _expected_videos_of_a_uniform_draw(100, 40, 50)  # ~40.2 of 50 pairs
    assert per_batch >= 0.8 * uniform, (per_batch, uniform)
    assert all(len(np.unique(b)) >= 2 for b in batches)
    # one video dominates: batches of it alone are merged until each has a candidate
    skewed = np.array([7] * 45 + [3, 9])
    batches = [skewed[b] for b in BatchShards(skewed, 5)]
    assert all(len(np.unique(b)) >= 2 for b in batches) and sum(map(len, batches)) == 47


@pytest.mark.parametrize("size", [227, 99])
def test_decoders_give_the_same_patches(tiny_corpus, size):
    index = PairIndex(tiny_corpus)
    jpeg = index.read_pair(0)[0]
    tv = PatchTransform(size, 0.0, decoder="torchvision")(jpeg)
    cv = PatchTransform(size, 0.0, decoder="opencv")(jpeg)
    assert tv.shape == cv.shape == (3, size, size) and tv.dtype == cv.dtype == torch.uint8
    assert (tv.float() - cv.float()).abs().mean() < 1.5
    for decoder in ("torchvision", "opencv"):
        with pytest.raises(ValueError, match="not a decodable JPEG"):
            PatchTransform(size, 0.0, decoder=decoder)(b"not a jpeg at all")


@pytest.mark.parametrize("size", [227, 99])
def test_batches_decoded_on_the_device_match_the_worker_decoder(tiny_corpus, size):
    from vidrep.data.datamodule import PairDataModule
    from vidrep.data.transforms import decode_batch, unpack_jpegs

    common = dict(
        batch_size=6, num_workers=0, input_size=size, val_fraction=0.25, pin_memory=False, persistent_workers=False
    )
    on_device = PairDataModule(str(tiny_corpus), decoder="device", **common)
    in_workers = PairDataModule(str(tiny_corpus), decoder="torchvision", **common)
    on_device.setup(), in_workers.setup()
    raw, reference = next(iter(on_device.val_dataloader())), next(iter(in_workers.val_dataloader()))
    data, lengths = raw["anchor"]  # the workers did not decode: one tensor of bytes per side
    assert data.dim() == 1 and data.dtype == torch.uint8 and lengths.shape == (6,) and int(lengths.sum()) == len(data)
    jpegs = unpack_jpegs(data, lengths)
    assert [bytes(j[:2].tolist()) for j in jpegs] == [b"\xff\xd8"] * 6  # each view starts a JPEG
    decoded = on_device.on_before_batch_transfer(raw, 0)  # no trainer: the CPU, no flips
    for key in ("anchor", "positive"):
        assert decoded[key].shape == (6, 3, size, size) and decoded[key].dtype == torch.uint8
        assert torch.equal(decoded[key], reference[key])
    assert torch.equal(decoded["video_id"], reference["video_id"])
    flipped = decode_batch(jpegs, size, "cpu", flip_p=1.0)
    assert torch.equal(flipped, reference["anchor"].flip(-1))
    with pytest.raises(ValueError, match="not a decodable JPEG"):
        decode_batch([torch.frombuffer(bytearray(b"not a jpeg at all"), dtype=torch.uint8)], size, "cpu")


# ---------------------------------------------------------------- damage: checksums, strict reads


def _damage_first_jpeg(root, name="a", at=4, length=8):
    """Overwrite bytes inside the first JPEG of shard `name` (the tar stays a valid tar)."""
    import pyarrow.parquet as pq

    row = pq.read_table(root / "manifest" / f"{name}.parquet").to_pylist()[0]
    with open(root / "shards" / f"{name}.tar", "r+b") as f:
        f.seek(row["query_offset"] + at)
        f.write(b"\x00" * length)
    return row["pair_id"]


def test_checksums_are_stored_and_checked(tmp_path):
    from vidrep.data.corpus import DamagedCorpusError

    write_shard(tmp_path, "a", [record("v1.mp4", 0), record("v1.mp4", 40)])
    rows = read_manifest(tmp_path).to_pylist()
    import zlib

    assert rows[0]["query_crc32"] == zlib.crc32(b"x" * 10 + b"q") and rows[0]["tracked_crc32"] == zlib.crc32(
        b"x" * 20 + b"t"
    )
    pair = _damage_first_jpeg(tmp_path)
    with pytest.raises(
        DamagedCorpusError,
        match=rf"pair {pair} in shard .*a.tar is damaged .*CRC32.*mine.py out={tmp_path} verify=true",
    ):
        PairIndex(tmp_path).read_pair(0)
    assert PairIndex(tmp_path).read_pair(1)  # the other pair is intact


def test_a_corpus_without_checksums_still_reads(tmp_path):
    import pyarrow.parquet as pq

    write_shard(tmp_path, "a", [record("v1.mp4", 0)])
    path = tmp_path / "manifest" / "a.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["query_crc32", "tracked_crc32"]), path)  # as mined before
    index = PairIndex(tmp_path)
    assert list(index.has_crc) == [False]
    with pytest.raises(CorpusError, match="start or end marker"):  # not JPEGs: the marker check still runs
        index.read_pair(0)


def test_training_reads_strictly_or_skips_and_counts(tiny_corpus, tmp_path):
    import shutil

    from vidrep.data.corpus import DamagedCorpusError

    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    index = PairIndex(root)
    name = index.shards[index.shard_index[0]].removesuffix(".tar")
    pair = _damage_first_jpeg(root, name, at=600, length=600)  # decodes "successfully" with OpenCV: wrong pixels
    row = next(i for i in range(len(index)) if index.pair_id(i) == pair)
    strict = PairDataset(PairIndex(root), np.array([row, (row + 1) % len(index)]), PatchTransform(67, 0.0))
    with pytest.raises(DamagedCorpusError, match=rf"pair {pair} in shard .*{name}.tar.*verify=true"):
        strict[0]
    lenient = PairDataset(
        PairIndex(root), np.array([row, (row + 1) % len(index)]), PatchTransform(67, 0.0), skip_damaged=True
    )
    item = lenient[0]
    assert int(item["damaged"]) == 1 and torch.equal(item["anchor"], strict[1]["anchor"])
    # a zeroed JPEG header, in a corpus without checksums: the decode fails, the pair is named
    with open(root / "shards" / f"{name}.tar", "r+b") as f:
        f.seek(int(index.tracked_offset[row]))
        f.write(b"\x00" * 64)
    index = PairIndex(root)
    index.has_crc = np.zeros(len(index), bool)
    with pytest.raises(DamagedCorpusError, match=rf"pair {pair} in shard"):
        PairDataset(index, np.array([row]), PatchTransform(67, 0.0))[0]


def test_damaged_or_lost_manifests_are_named(tmp_path):
    from vidrep.common.io import write_json
    from vidrep.data.corpus import DamagedCorpusError, check_complete

    write_shard(tmp_path, "a", [record("v1.mp4", 0)])
    write_shard(tmp_path, "b", [record("v2.mp4", 0)])
    write_json(tmp_path / "summary.json", {"pairs": 2})
    check_complete(tmp_path, read_manifest(tmp_path).num_rows)
    (tmp_path / "manifest" / "b.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DamagedCorpusError, match=r"b.parquet.*verify=true.*verify=repair"):
        read_manifest(tmp_path)
    (tmp_path / "manifest" / "b.parquet").unlink()
    with pytest.raises(DamagedCorpusError, match=r"hold 1 pairs but summary.json counts 2.*verify=true"):
        check_complete(tmp_path, read_manifest(tmp_path).num_rows)


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    from vidrep.common import io
    from vidrep.data import corpus

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    corpus.init_corpus(tmp_path)
    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"cannot write .*a.tar \(No space left on device\).*rerun the same command"):
        write_shard(tmp_path, "a", [record("v1.mp4", 0)])
    assert not list((tmp_path / "shards").iterdir()), "no partial file left"


def test_too_few_validation_batches_for_the_processes_is_an_error_naming_the_keys(tiny_corpus, monkeypatch):
    import vidrep.data.datamodule as datamodule

    dm = PairDataModule(str(tiny_corpus), batch_size=40, num_workers=0, input_size=67, val_fraction=0.25)
    dm.setup()
    monkeypatch.setattr(datamodule, "_distributed", lambda: (4, 0))  # 4 ranks, 1 validation batch
    with pytest.raises(CorpusError, match="lower data.batch_size, raise data.val_fraction"):
        dm.val_dataloader()
    monkeypatch.setattr(datamodule, "_distributed", lambda: None)
    assert len(dm.val_dataloader()) >= 1


def test_a_one_video_corpus_and_a_one_video_validation_split_are_errors_naming_the_fix(tiny_corpus, tmp_path):
    import shutil

    from vidrep.data.corpus import CorpusError

    root = tmp_path / "one"
    shutil.copytree(tiny_corpus, root)
    (root / "summary.json").unlink()  # the totals of all 12 videos
    for manifest in sorted((root / "manifest").glob("*.parquet"))[1:]:
        manifest.unlink()
    common = dict(batch_size=2, num_workers=0, input_size=67)
    with pytest.raises(CorpusError, match=r"training pairs of 1 video\(s\); negatives come from other videos.*mine"):
        PairDataModule(str(root), val_fraction=0.0, **common).setup()
    # 12 videos, 5% for validation: one video, on which every triplet's negatives are missing
    with pytest.raises(CorpusError, match=r"data.val_fraction=0.05 gives a validation split of 1 video.*raise data"):
        PairDataModule(str(tiny_corpus), val_fraction=0.05, **common).setup()
    dm = PairDataModule(str(tiny_corpus), val_fraction=0.25, **common)
    dm.setup()
    assert len(np.unique(dm.val_set.video_ids())) >= 2
