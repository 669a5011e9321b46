"""The detection protocol's fine-tuning: R-CNN's windows and batches, their dealing to DDP ranks,
the loader's crops, and iterative fine-tuning's re-adaptation through TripletModule."""

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vidrep.eval.warp import warp_regions
from vidrep.eval.windows import (
    DecodedImages,
    WindowBatches,
    WindowCrops,
    Windows,
    build_windows,
    deal,
    whole_batch,
    window_batch,
)


@dataclass
class _Image:
    id: str
    path: Path
    boxes: np.ndarray  # 1-based, as VOCImage
    labels: np.ndarray


class _Store:
    def __init__(self, boxes):
        self.by_id = boxes

    def boxes(self, im):
        return self.by_id[im.id]


def _iou_brute(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def _split(num_images=40, seed=0):
    rng = np.random.default_rng(seed)
    images, props = [], {}
    for i in range(num_images):
        g = rng.integers(1, 3)
        xy = rng.uniform(0, 100, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(20, 60, (g, 2))], 1).round().astype(np.float32)
        images.append(_Image(f"im{i}", Path(f"im{i}.jpg"), gt + 1, rng.integers(0, 3, g)))
        pxy = rng.uniform(0, 140, (30, 2))
        props[f"im{i}"] = np.concatenate([pxy, pxy + rng.uniform(5, 60, (30, 2))], 1).astype(np.float32)
    return images, _Store(props)


def test_windows_follow_rcnn_ranges_against_brute_force():
    images, store = _split(12)
    w = build_windows(images, store, 3, 0.5, (0.1, 0.5))
    expected_fg, expected_bg = set(), set()
    for i, im in enumerate(images):
        gt = im.boxes - 1
        for box in np.concatenate([gt, store.boxes(im)]):
            ious = [_iou_brute(box, g) for g in gt]
            best = max(ious)
            if best >= 0.5:
                expected_fg.add((i, *box.tolist(), int(im.labels[int(np.argmax(ious))]) + 1))
            elif 0.1 <= best < 0.5:
                expected_bg.add((i, *box.tolist(), 0))
    rows = [(int(i), *b.tolist(), int(c)) for i, b, c in zip(w.image, w.box, w.label)]
    assert set(rows[: w.num_fg]) == expected_fg and set(rows[w.num_fg :]) == expected_bg
    assert len(rows) == len(expected_fg) + len(expected_bg)  # ground truth is foreground (IoU 1), nothing twice
    assert w.image.dtype == np.int32 and w.box.dtype == np.float32 and w.label.dtype == np.uint8


def test_a_batch_is_32_foreground_and_96_background_from_the_whole_set():
    images, store = _split(60)
    w = build_windows(images, store, 3, 0.5, (0.0, 0.5))
    seen = set()
    for step in range(20):
        rows, flips = window_batch(7, step, w.num_fg, w.num_bg, 128, 0.25, True)
        # Caffe: int(128 x 0.25) foreground, the rest background
        assert len(rows) == 128 and (rows < w.num_fg).sum() == 32
        assert (w.label[rows[rows < w.num_fg]] > 0).all() and (w.label[rows[rows >= w.num_fg]] == 0).all()
        assert len(np.unique(w.image[rows])) > 40  # windows of many images, not 2
        assert 30 < flips.sum() < 98
        seen.update(w.image[rows].tolist())
    assert len(seen) == 60  # every image of the split is drawn from
    again, _ = window_batch(7, 3, w.num_fg, w.num_bg, 128, 0.25, True)
    assert (again == window_batch(7, 3, w.num_fg, w.num_bg, 128, 0.25, True)[0]).all()
    assert not (again == window_batch(8, 3, w.num_fg, w.num_bg, 128, 0.25, True)[0]).all()


def _windows(n_fg=50, n_bg=150):
    return Windows(
        np.arange(n_fg + n_bg, dtype=np.int32),
        np.zeros((n_fg + n_bg, 4), np.float32),
        np.r_[np.ones(n_fg, np.uint8), np.zeros(n_bg, np.uint8)],
        n_fg,
    )


def test_a_resumed_sampler_continues_the_same_sequence():
    w = _windows()
    whole = list(WindowBatches(w, 128, 0.25, True, 3, 0, 10))
    assert len(whole) == 10
    assert list(WindowBatches(w, 128, 0.25, True, 3, 0, 4)) + list(WindowBatches(w, 128, 0.25, True, 3, 4, 10)) == whole


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_dealt_distinct_shares_of_every_batch(world):
    w = _windows()
    per_rank = [list(WindowBatches(w, 128, 0.25, True, 3, 5, 9, world, rank)) for rank in range(world)]
    for step, one in enumerate(WindowBatches(w, 128, 0.25, True, 3, 5, 9)):
        shares = [per_rank[r][step] for r in range(world)]
        assert [len(s) for s in shares] == [128 // world + (r < 128 % world) for r in range(world)]
        assert sum(shares, []) == one  # the union, in order, is one process's batch
    positions = [set(range(128)[deal(128, world, r)]) for r in range(world)]
    assert set().union(*positions) == set(range(128)) and sum(map(len, positions)) == 128


def test_the_loader_warps_each_window_and_mirrors_it(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        img = rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        paths.append(tmp_path / f"{i}.png")
    boxes = np.array([[3, 4, 40, 30], [0, 0, 69, 49], [10, 5, 60, 58]], np.float32)
    w = Windows(np.array([0, 0, 1], np.int32), boxes, np.array([2, 0, 1], np.uint8), 1)
    got = WindowCrops(paths, w, 35, 4).__getitems__([(2, True), (0, False), (1, False)])
    assert got["labels"].tolist() == [1, 2, 0] and got["crops"].dtype == torch.uint8
    for k, (row, flip) in enumerate([(2, True), (0, False), (1, False)]):
        rgb = torch.from_numpy(cv2.imread(str(paths[w.image[row]]))[:, :, ::-1].transpose(2, 0, 1).copy())
        crop, mask = warp_regions(rgb, boxes[row : row + 1], 35, 4)
        crop = crop.round().clamp(0, 255).to(torch.uint8)
        if flip:
            crop, mask = crop.flip(-1), mask.flip(-1)
        assert torch.equal(got["crops"][k], crop[0]) and torch.equal(got["mask"][k], mask[0])

    # the images decoded once into the cache (the default) give the same crops, in a worker process too
    decoded = DecodedImages.build(tmp_path / "decoded", paths)
    assert DecodedImages.build(tmp_path / "decoded", paths).shape.tolist() == [[50, 70], [60, 70]]  # reused
    from_file = WindowCrops(paths, w, 35, 4, decoded)
    items = [(2, True), (0, False), (1, False)]
    assert all(torch.equal(a, b) for a, b in zip(from_file.__getitems__(items).values(), got.values()))
    loader = DataLoader(from_file, batch_sampler=[items], collate_fn=whole_batch, num_workers=1)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(loader)).values(), got.values()))


def _model_cfg():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "vidrep" / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=["ckpt=random", "voc.root=x"]).model


def test_readaptation_trains_through_triplet_module_and_resumes(tiny_corpus, tmp_path, monkeypatch, caplog):
    import lightning as L

    from vidrep.eval import adapt as adapt_module
    from vidrep.eval.adapt import readapt
    from vidrep.eval.trainer import checkpoint_step
    from vidrep.models.caffenet import CaffeNet
    from vidrep.training.checkpoints import HASH_KEY, DamagedCheckpointError

    torch.manual_seed(0)
    trunk = CaffeNet(67, 64, 32)
    before = trunk.conv3.weight.detach().clone()
    adapt = {"corpus": str(tiny_corpus), "steps": 3, "batch_size": 8, "lr": 0.01, "checkpoint_every": 1, "workers": 0}
    model_cfg = _model_cfg()
    make = adapt_module.make_trainer

    class Interrupt(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("interrupted")

    def interrupted(*args, **kwargs):
        trainer = make(*args, **kwargs)
        trainer.callbacks.append(Interrupt())
        return trainer

    monkeypatch.setattr(adapt_module, "make_trainer", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        readapt(trunk, 67, adapt, model_cfg, tmp_path / "adapt0", "cpu")
    last = tmp_path / "adapt0" / "last.ckpt"
    assert last.exists() and not (tmp_path / "adapt0" / "adapted.pt").exists()
    # written by HashedCheckpointIO: a damaged byte is refused by name instead of resumed from
    assert HASH_KEY in torch.load(last, map_location="cpu", weights_only=False)
    good = last.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    last.write_bytes(bytes(damaged))
    with pytest.raises(DamagedCheckpointError, match="last.ckpt"):
        checkpoint_step(tmp_path / "adapt0")
    last.write_bytes(good)
    monkeypatch.setattr(adapt_module, "make_trainer", make)
    with caplog.at_level(logging.INFO, logger="vidrep.eval.adapt"):
        readapt(trunk, 67, adapt, model_cfg, tmp_path / "adapt0", "cpu")
    assert "re-adaptation resumes at step 2 of 3" in caplog.text
    assert (tmp_path / "adapt0" / "adapted.pt").exists() and not list((tmp_path / "adapt0").glob("*.ckpt"))
    assert not torch.equal(trunk.conv3.weight, before)
    metrics = (tmp_path / "adapt0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/hard_phase" in metrics
    hard = [row.split(",") for row in metrics.splitlines()]
    column = hard[0].index("train/hard_phase_step")
    assert {r[column] for r in hard[1:] if len(r) > column and r[column]} == {
        "1.0"
    }  # the paper's top-K negatives from step 0

    fresh = CaffeNet(67, 64, 32)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("a finished re-adaptation ran again"))
    readapt(fresh, 67, adapt, model_cfg, tmp_path / "adapt0", "cpu")
    assert torch.equal(fresh.conv3.weight, trunk.conv3.weight)
