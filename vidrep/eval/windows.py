"""R-CNN's fine-tuning windows: every training window of the split, drawn 32 foreground + 96
background per 128-batch from the whole set, as Caffe's WindowDataLayer drew them.

Sources: rbgirshick/rcnn finetuning/rcnn_make_window_file.m (every roidb box of every image, ground
truth and proposals, with its highest IoU over the classes and that class; IoU < 1e-5 is label 0)
and BVLC/caffe src/caffe/layers/window_data_layer.cpp (foreground: IoU >= fg_threshold; background:
IoU < bg_threshold, label forced to 0; per batch int(batch_size x fg_fraction) foreground windows,
the rest background, each an independent uniform draw over its whole list (`rand % size`, with
replacement), each mirrored with probability 1/2; every window's image read and warped).

The index is compact numpy (per window: float32 box 16 B, int32 image 4 B, uint8 label 1 B): at
VOC2012 train scale, 5,717 images x ~2,002 windows = ~11.4M windows x 21 B = ~240 MB, shared
copy-on-write with the loader's worker processes. Batches are a pure function of (seed, step), so a
resumed run draws the same batches from its checkpoint's step, and every rank of a DDP run takes
its own share of the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from vidrep.common.io import atomic_write, write_npz
from vidrep.data.shares import rank_shares
from vidrep.eval.boxes import class_overlap
from vidrep.eval.images import read_rgb
from vidrep.eval.warp import warp_regions


@dataclass(frozen=True)
class Windows:
    """Windows of one split, foreground first: rows [0, num_fg) are foreground, the rest background."""

    image: np.ndarray  # [N] int32 index into the split's images
    box: np.ndarray  # [N, 4] float32 x1, y1, x2, y2, 0-based inclusive pixels
    label: np.ndarray  # [N] uint8: 0 background, c + 1 for class c
    num_fg: int

    @property
    def num_bg(self) -> int:
        return len(self.image) - self.num_fg

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.box.nbytes + self.label.nbytes

    def save(self, path: Path) -> None:
        write_npz(path, {"image": self.image, "box": self.box, "label": self.label, "num_fg": np.array(self.num_fg)})

    @classmethod
    def load(cls, path: Path) -> "Windows":
        with np.load(path) as z:
            return cls(z["image"], z["box"], z["label"], int(z["num_fg"]))


def image_windows(
    gt: np.ndarray,
    gt_labels: np.ndarray,
    proposals: np.ndarray,
    num_classes: int,
    fg_iou: float,
    bg_iou: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's (fg boxes, fg labels, bg boxes, bg labels) from its ground truth (difficult
    included, as roidb_from_voc.m) and proposals: each box's label is the class of its highest
    IoU (inclusive pixels), foreground when that IoU >= fg_iou, background (label 0) when it lies in
    [bg_iou[0], bg_iou[1]); the windows in between are used for neither."""
    boxes = np.concatenate([gt, proposals]).astype(np.float32).reshape(-1, 4)
    overlap = class_overlap(boxes, gt, gt_labels, num_classes)
    best = overlap.max(1) if num_classes else np.zeros(len(boxes), np.float32)
    fg = best >= fg_iou
    bg = (best >= bg_iou[0]) & (best < bg_iou[1])
    return boxes[fg], (overlap[fg].argmax(1) + 1).astype(np.uint8), boxes[bg], np.zeros(int(bg.sum()), np.uint8)


def build_windows(images, store, num_classes: int, fg_iou: float, bg_iou: Sequence[float]) -> Windows:
    """The Windows of `images` (VOCImages) with their proposals from `store` (a ProposalStore)."""
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("fg_box", "fg_label", "fg_image", "bg_box", "bg_label", "bg_image")
    }
    for i, im in enumerate(tqdm(images, desc="fine-tuning windows", unit="image")):
        fb, fl, bb, bl = image_windows(im.boxes - 1.0, im.labels, store.boxes(im), num_classes, fg_iou, bg_iou)
        for kind, box, label in (("fg", fb, fl), ("bg", bb, bl)):
            parts[f"{kind}_box"].append(box)
            parts[f"{kind}_label"].append(label)
            parts[f"{kind}_image"].append(np.full(len(box), i, np.int32))
    cat = lambda k, empty: np.concatenate(parts[k]) if parts[k] else empty  # noqa: E731
    num_fg = sum(len(b) for b in parts["fg_box"])
    windows = Windows(
        np.concatenate([cat("fg_image", np.zeros(0, np.int32)), cat("bg_image", np.zeros(0, np.int32))]),
        np.concatenate([cat("fg_box", np.zeros((0, 4), np.float32)), cat("bg_box", np.zeros((0, 4), np.float32))]),
        np.concatenate([cat("fg_label", np.zeros(0, np.uint8)), cat("bg_label", np.zeros(0, np.uint8))]),
        num_fg,
    )
    if windows.num_fg == 0 or windows.num_bg == 0:
        raise ValueError(
            f"the fine-tuning split ({len(images)} images) has {windows.num_fg} foreground windows (IoU >= {fg_iou}) "
            f"and {windows.num_bg} background windows (IoU in [{bg_iou[0]}, {bg_iou[1]})); it needs both: check "
            "the annotations and proposals, or protocol.fg_iou / protocol.bg_iou"
        )
    return windows


def window_batch(
    seed: int, step: int, num_fg: int, num_bg: int, batch_size: int, fg_fraction: float, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Global batch `step`: (window rows [batch_size] int64, mirror flags [batch_size] bool).
    int(batch_size x fg_fraction) foreground rows drawn uniformly with replacement from [0, num_fg),
    the rest from the background rows [num_fg, num_fg + num_bg), in a shuffled order (so that every
    rank's share mixes both); a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    n_fg = int(batch_size * fg_fraction)
    rows = np.concatenate([rng.integers(0, num_fg, n_fg), num_fg + rng.integers(0, num_bg, batch_size - n_fg)])
    flips = rng.random(batch_size) < 0.5 if flip else np.zeros(batch_size, bool)
    order = rng.permutation(batch_size)
    return rows[order], flips[order]


def deal(batch_size: int, world: int, rank: int) -> slice:
    """The positions of a global batch that rank `rank` of `world` trains (rank_shares: 128 on 3
    ranks -> 43 + 43 + 42); the ranks' slices partition the batch."""
    shares = rank_shares(batch_size, world)
    lo = sum(shares[:rank])
    return slice(lo, lo + shares[rank])


class WindowBatches(Sampler):
    """This rank's share of the global batches of steps [start, stop): lists of (window row,
    mirror) pairs. No __len__: Lightning treats the loader as endless and stops at max_steps, and
    a resumed run passes its checkpoint's step as `start` (Lightning does not restore samplers)."""

    def __init__(
        self,
        windows: Windows,
        batch_size: int,
        fg_fraction: float,
        flip: bool,
        seed: int,
        start: int,
        stop: int,
        world: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_fg, self.num_bg = windows.num_fg, windows.num_bg
        self.batch_size, self.fg_fraction, self.flip, self.seed = batch_size, fg_fraction, flip, seed
        self.start, self.stop = start, stop
        self.share = deal(batch_size, world, rank)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start, self.stop):
            rows, flips = window_batch(
                self.seed, step, self.num_fg, self.num_bg, self.batch_size, self.fg_fraction, self.flip
            )
            yield list(zip(rows[self.share].tolist(), flips[self.share].tolist()))


class DecodedImages:
    """A split's images decoded once into one uint8 file (RGB rows, image after image) with an index,
    so the fine-tuning loaders warp windows without decoding a JPEG per window (half a loader's work:
    ~4 ms decode + ~4 ms warp per window on one core); memory-mapped, so the workers share one copy
    in the page cache. VOC2012 train: 5,717 images x ~500 x 375 x 3 B = ~3.2 GB on disk. The index is
    written last, so a build killed half-way is redone, not read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        with np.load(self.folder / "images_index.npz") as z:
            self.offset, self.shape = z["offset"], z["shape"]
        self._data = None  # opened in each process (the loaders' workers)

    def __len__(self) -> int:
        return len(self.offset)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.folder / "images.u8", np.uint8, "r")
        h, w = self.shape[i]
        # a copy (one memcpy): torch refuses to wrap the read-only map without a warning
        return np.array(self._data[self.offset[i] : self.offset[i] + h * w * 3]).reshape(h, w, 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    @classmethod
    def build(cls, folder: Path, paths: Sequence[str | Path]) -> "DecodedImages":
        """The images at `paths` from `folder` (decoded and written there first when missing)."""
        folder = Path(folder)
        if (folder / "images_index.npz").exists():
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        offset, shape = np.zeros(len(paths), np.int64), np.zeros((len(paths), 2), np.int64)

        def write(f) -> None:
            at = 0
            for i, path in enumerate(tqdm(paths, desc="fine-tuning images, decoded once", unit="image")):
                img = read_rgb(path)
                offset[i], shape[i] = at, img.shape[:2]
                f.write(img.tobytes())
                at += img.size

        atomic_write(folder / "images.u8", write)
        write_npz(folder / "images_index.npz", {"offset": offset, "shape": shape})
        return cls(folder)


class WindowCrops(Dataset):
    """A batch of windows as the network's input: each needed image decoded once and its windows
    warped together (vidrep/eval/warp.py: R-CNN's crop with `padding` pixels of context), rounded
    to uint8 as Caffe's 8-bit cv::resize leaves them, mirrored where drawn. Returns {"crops" uint8
    [B, 3, S, S], "mask" bool [B, 1, S, S] (False: R-CNN's zero padding, applied after the mean
    subtraction), "labels" int64 [B]}. `decoded`: the same images already decoded (DecodedImages),
    read instead of the JPEGs."""

    def __init__(
        self,
        paths: Sequence[str],
        windows: Windows,
        crop_size: int,
        padding: int,
        decoded: DecodedImages | None = None,
    ) -> None:
        self.paths, self.windows, self.crop_size, self.padding = [str(p) for p in paths], windows, crop_size, padding
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.windows.image)

    def __getitems__(self, items: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        rows = np.fromiter((r for r, _ in items), np.int64, len(items))
        flips = torch.tensor([f for _, f in items], dtype=torch.bool)
        s = self.crop_size
        crops = torch.zeros(len(rows), 3, s, s, dtype=torch.uint8)
        mask = torch.zeros(len(rows), 1, s, s, dtype=torch.bool)
        images = self.windows.image[rows]
        for i in np.unique(images):
            at = np.nonzero(images == i)[0]
            rgb = self.decoded[i] if self.decoded is not None else read_rgb(self.paths[i])
            img = torch.from_numpy(rgb.transpose(2, 0, 1))
            c, m = warp_regions(img, self.windows.box[rows[at]], s, self.padding)
            crops[at] = c.round_().clamp_(0, 255).to(torch.uint8)
            mask[at] = m
        crops[flips], mask[flips] = crops[flips].flip(-1), mask[flips].flip(-1)
        return {"crops": crops, "mask": mask, "labels": torch.from_numpy(self.windows.label[rows].astype(np.int64))}

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([item]).items()}


def whole_batch(batch: dict) -> dict:
    """The DataLoader's collate_fn: __getitems__ already built the batch."""
    return batch


def window_file(folder: Path, images, store, num_classes: int, fg_iou: float, bg_iou: Sequence[float]) -> Windows:
    """The split's Windows from `folder/windows.npz`, built and saved there first when missing."""
    path = Path(folder) / "windows.npz"
    if path.exists():
        return Windows.load(path)
    windows = build_windows(images, store, num_classes, fg_iou, bg_iou)
    windows.save(path)
    return windows
