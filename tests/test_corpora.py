import json
import shutil

import numpy as np
import pytest

from vidrep.data.corpora import corpus_settings, open_index
from vidrep.data.corpus import CorpusError, PairIndex, read_manifest
from vidrep.data.datamodule import PairDataModule


@pytest.fixture
def two_halves(tiny_corpus, tmp_path):
    """The tiny corpus split by video into two corpora (every file of a video is named by its id)."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_corpus, a)
    (a / "summary.json").unlink()  # it counts the whole corpus; each half is checked against its own manifests
    b.mkdir()
    for sub in ("manifest", "shards", "videos"):
        (b / sub).mkdir()
    shutil.copy(a / "corpus.json", b / "corpus.json")
    settings = json.loads((a / "mining.json").read_text())
    (b / "mining.json").write_text(json.dumps({**settings, "min_moving": 0.3}))
    for manifest in sorted((a / "manifest").glob("*.parquet"))[::2]:
        for sub, ext in (("manifest", ".parquet"), ("shards", ".tar"), ("videos", ".parquet")):
            src = a / sub / f"{manifest.stem}{ext}"
            if src.exists():
                shutil.move(src, b / sub / src.name)
    return a, b


def test_two_corpora_read_as_one(tiny_corpus, two_halves):
    whole = PairIndex(tiny_corpus)
    both = open_index([str(p) for p in two_halves])
    assert len(both) == len(whole) and len(PairIndex(two_halves[1])) > 0
    # every pair reads the same bytes as in the whole corpus
    ids = [i for root in two_halves for i in read_manifest(root).column("pair_id").to_pylist()]
    where = {pid: j for j, pid in enumerate(read_manifest(tiny_corpus).column("pair_id").to_pylist())}
    for i in range(len(both)):
        assert both.read_pair(i) == whole.read_pair(where[ids[i]])
    # a video keeps one id; the second corpus's ids are new ones, none equal to the first's
    assert len(np.unique(both.video_id)) == len(np.unique(whole.video_id))
    first = len(read_manifest(two_halves[0]))
    assert not set(both.video_id[first:]) & set(whole.video_id)
    settings = corpus_settings(list(two_halves))
    assert [s["min_moving"] for s in settings.values()] == [
        json.loads((tiny_corpus / "mining.json").read_text())["min_moving"],
        0.3,
    ]


def test_the_datamodule_takes_a_list_and_a_small_corpus_says_which_key_to_lower(tiny_corpus, two_halves):
    dm = PairDataModule([str(p) for p in two_halves], batch_size=8, num_workers=0, input_size=67, val_fraction=0.25)
    dm.setup()
    single = PairDataModule(str(tiny_corpus), batch_size=8, num_workers=0, input_size=67, val_fraction=0.25)
    single.setup()
    assert len(dm.train_set) + len(dm.val_set) == len(single.train_set) + len(single.val_set)
    with pytest.raises(CorpusError, match="lower data.batch_size"):
        PairDataModule(str(tiny_corpus), batch_size=10_000, num_workers=0, input_size=67).setup()
