"""R-CNN's proposals stage: region proposals per image, cached on disk one .npy per image (so a
killed run keeps what it finished and memory holds one image's boxes at a time).

Either imported once from R-CNN's published boxes (`protocol.proposals.dir`): its selective-search
files (rbgirshick/rcnn data/fetch_selective_search_data.sh: voc_2007_trainval.mat, voc_2012_val.mat,
..., read by imdb/roidb_from_voc.m), one per split, holding `boxes` (a cell per image of [P, 4] boxes
y1 x1 y2 x2 in 1-based pixels) and `images` (the image ids, in the same order).

Or computed by OpenCV's selective search in `workers` processes, by default (`mode: rcnn`) set as
R-CNN computed its boxes (rbgirshick/rcnn selective_search/selective_search_boxes.m, called with
fast_mode = true and no im_width, so on the whole image): colour spaces HSV and Lab; Felzenszwalb-
Huttenlocher segmentations with k in {50, 100}, min size = k, sigma 0.8; two merging strategies,
colour + texture + size + fill and texture + size + fill; boxes narrower or shorter than 20 pixels
dropped (FilterBoxesWidth, inclusive widths); duplicates removed; no cap. What OpenCV's
ximgproc cannot match: its colour and texture histograms and HSV scaling are its own
(selectivesearchsegmentation.cpp, not the IJCV code's mex files), its strategies average their
similarities where the MATLAB code sums them (the same ranking of merges), and its random ranking of
the hierarchies' boxes (level x rand) draws from std::rand, not MATLAB's rand, so the order of the
boxes differs (with no cap, the set does not depend on it). `mode: fast | quality` are OpenCV's own
presets (fast: k 150, 300, 450 with OpenCV's min size 100; the earlier default with max_side 500,
max_proposals 2000, min_size 9).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vidrep.common.io import write_array
from vidrep.data.voc import VOCImage

log = logging.getLogger(__name__)


def _seed_libc_rand(seed: int) -> None:
    """OpenCV's selective search ranks its boxes with std::rand() (cv2.setRNGSeed does not reach it):
    seeding it per image makes an image's boxes independent of what its process computed before,
    so one process and many agree (tested)."""
    import ctypes

    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, AttributeError):
        pass


RCNN_K = (50, 100)  # selective_search_boxes.m fast mode: ks(1:2) of [50 100 150 300], minSize = k
RCNN_SIGMA = 0.8
PROPOSAL_MODES = ("rcnn", "fast", "quality")


def _rcnn_search(image: np.ndarray):
    """OpenCV's selective search configured as selective_search_boxes.m's fast mode (see the module's docstring)."""
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    ss.clearImages()
    ss.clearGraphSegmentations()
    ss.clearStrategies()
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2Lab))
    for k in RCNN_K:
        ss.addGraphSegmentation(seg.createGraphSegmentation(sigma=RCNN_SIGMA, k=float(k), min_size=k))
    colour, texture = (
        seg.createSelectiveSearchSegmentationStrategyColor(),
        seg.createSelectiveSearchSegmentationStrategyTexture(),
    )
    size, fill = (
        seg.createSelectiveSearchSegmentationStrategySize(),
        seg.createSelectiveSearchSegmentationStrategyFill(),
    )
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(colour, texture, size, fill))
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(texture, size, fill))
    return ss


def selective_search(
    image: np.ndarray,
    max_side: int | None = None,
    mode: str = "rcnn",
    max_proposals: int | None = None,
    min_size: int = 20,
) -> np.ndarray:
    """[P, 4] float32 boxes x1, y1, x2, y2 (0-based inclusive, in `image`'s pixels; `image` is BGR as
    cv2.imread gives it), in the order OpenCV ranks them, without duplicates: those at least
    `min_size` pixels wide and high (in the searched image, as FilterBoxesWidth), the first
    `max_proposals` (None: all). `max_side`: search a copy whose longer side is at most that (None:
    the whole image, as R-CNN)."""
    if mode not in PROPOSAL_MODES:
        raise ValueError(f"protocol.proposals.mode={mode!r}; choose from {PROPOSAL_MODES}")
    cv2.setNumThreads(1)
    _seed_libc_rand(0)
    scale = min(1.0, max_side / max(image.shape[:2])) if max_side else 1.0
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    if mode == "rcnn":
        ss = _rcnn_search(small)
    else:
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(small)
        ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    rects = ss.process().astype(np.float32).reshape(-1, 4)  # x, y, w, h
    rects = rects[(rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)]
    _, first = np.unique(rects, axis=0, return_index=True)  # BoxRemoveDuplicates, keeping the ranking
    rects = rects[np.sort(first)]
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] - 1], axis=1) / scale
    return boxes[:max_proposals] if max_proposals else boxes


def _compute_one(job: tuple[str, str, dict]) -> str:
    image_path, out_path, settings = job
    img = cv2.imread(image_path)
    if img is None:
        raise FileNotFoundError(f"cannot read image {image_path}")
    write_array(out_path, selective_search(img, **settings))
    return out_path


def read_rcnn_mat(path: str | Path) -> dict[str, np.ndarray]:
    """{image id: [P, 4] float32 x1, y1, x2, y2 0-based} from one of R-CNN's selective-search files."""
    from scipy.io import loadmat

    m = loadmat(str(path))
    if "boxes" not in m or "images" not in m:
        raise ValueError(
            f"{path} has no 'boxes' and 'images' variables: expected R-CNN's selective-search layout "
            "(a cell of [P, 4] y1 x1 y2 x2 1-based boxes per image and a cell of image ids)"
        )
    ids = [str(np.asarray(i).ravel()[0]) for i in m["images"].ravel()]
    boxes = m["boxes"].ravel()
    if len(ids) != len(boxes):
        raise ValueError(f"{path}: {len(boxes)} box sets for {len(ids)} image ids")
    return {
        i: (np.asarray(b, np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]] - 1.0).astype(np.float32)
        for i, b in zip(ids, boxes)
    }


def _mat_ids(path: Path) -> set[str]:
    from scipy.io import loadmat

    return {
        str(np.asarray(i).ravel()[0])
        for i in loadmat(str(path), variable_names=["images"]).get("images", np.zeros(0)).ravel()
    }


class ProposalStore:
    """Proposals of one data set under one setting: `ensure(images)` computes or imports what is
    missing; `boxes(image)` reads one image's [P, 4] float32 boxes."""

    def __init__(self, cache_dir: Path, data_key: str, settings: dict) -> None:
        settings = dict(settings)
        self.workers = int(settings.pop("workers", 1))
        self.source = settings.pop("dir", None)
        self.settings = settings
        described = {"dir": str(Path(self.source).expanduser().resolve())} if self.source else settings
        name = hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=6).hexdigest()
        self.folder = Path(cache_dir) / "proposals" / data_key / name

    def path(self, image: VOCImage) -> Path:
        return self.folder / f"{image.id}.npy"

    def boxes(self, image: VOCImage) -> np.ndarray:
        return np.load(self.path(image))

    def ensure(self, images: Sequence[VOCImage]) -> None:
        missing = [im for im in images if not self.path(im).exists()]
        if not missing:
            return
        if self.source:
            self._import(missing)
            return
        log.info("selective search on %d images in %d processes", len(missing), self.workers)
        jobs = [(str(im.path), str(self.path(im)), self.settings) for im in missing]
        bar = tqdm(total=len(jobs), desc="selective search", unit="image")
        if self.workers <= 1:
            for job in jobs:
                _compute_one(job)
                bar.update()
        else:
            with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
                for _ in pool.map(_compute_one, jobs, chunksize=4):
                    bar.update()
        bar.close()

    def _import(self, missing: Sequence[VOCImage]) -> None:
        folder = Path(self.source).expanduser()
        files = sorted(folder.glob("*.mat"))
        if not files:
            raise FileNotFoundError(
                f"protocol.proposals.dir={folder} holds no .mat file; put R-CNN's selective-search files there "
                "(voc_2012_train.mat, voc_2012_val.mat, ...)"
            )
        wanted = {im.id for im in missing}
        for f in files:
            if not wanted & _mat_ids(f):
                continue
            for image_id, b in read_rcnn_mat(f).items():
                if image_id in wanted:
                    write_array(self.folder / f"{image_id}.npy", b)
                    wanted.discard(image_id)
        if wanted:
            raise FileNotFoundError(
                f"{len(wanted)} images have no proposals in {folder}/*.mat (e.g. {sorted(wanted)[:3]}): "
                "give the files of both splits"
            )
