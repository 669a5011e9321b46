"""PASCAL VOC in the standard VOCdevkit layout, read from disk (never downloaded).

<root>/VOC2007/Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/<split>.txt
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidrep.data.synthetic import SHAPES

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
LAYOUT = "<root>/VOC<year>/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}"


class VOCError(RuntimeError):
    """A VOC root or file that is missing or malformed; the message names it and the expected layout."""


@dataclass(frozen=True)
class VOCImage:
    id: str
    path: Path
    boxes: np.ndarray  # [G, 4] float32 x1, y1, x2, y2, inclusive pixel coordinates (1-based, as in the XML)
    labels: np.ndarray  # [G] int64 class index
    difficult: np.ndarray  # [G] bool

    def target(self) -> dict:
        import torch

        return {
            "boxes": torch.from_numpy(self.boxes),
            "labels": torch.from_numpy(self.labels),
            "difficult": torch.from_numpy(self.difficult),
        }

    @property
    def boxes0(self) -> np.ndarray:
        """The ground-truth boxes in 0-based pixels (the XML's are 1-based), as the detection stages use them."""
        return self.boxes - 1.0

    def class_labels(self, num_classes: int) -> np.ndarray:
        """Per class: 1 present (a non-difficult object), 0 only difficult objects, -1 absent."""
        out = np.full(num_classes, -1, np.int64)
        out[self.labels[self.difficult]] = 0
        out[self.labels[~self.difficult]] = 1
        return out


def voc_dir(root: str | Path, year: int | str) -> Path:
    base = Path(root).expanduser() / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        if not (base / sub).is_dir():
            raise VOCError(
                f"{base / sub} is missing: a VOC root must follow {LAYOUT} (e.g. voc.root=/data/VOCdevkit "
                "voc.year=2007)"
            )
    return base


def _parse(xml_path: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as e:
        raise VOCError(f"cannot read annotation {xml_path}: {e}") from None
    boxes, labels, difficult = [], [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            hint = (
                f"voc.classes='[{','.join(SHAPES)}]' (a synthetic set's)"
                if name in SHAPES
                else "voc.classes='[...]' with this set's classes"
            )
            raise VOCError(
                f"{xml_path}: object class {name!r} is not in the configured classes {list(classes)}; set {hint}"
            )
        bb = obj.find("bndbox")
        try:
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (AttributeError, TypeError, ValueError):
            raise VOCError(
                f"{xml_path}: an object of class {name!r} has no valid <bndbox> xmin/ymin/xmax/ymax"
            ) from None
        labels.append(classes.index(name))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), np.asarray(difficult, bool))


def read_voc(root: str | Path, year: int | str, split: str, classes: tuple[str, ...] = VOC_CLASSES) -> list[VOCImage]:
    base = voc_dir(root, year)
    ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise VOCError(f"{ids_file} is missing: split {split!r} of VOC{year} must be listed there ({LAYOUT})")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCError(f"{ids_file} lists no image")
    images = []
    for i in ids:
        jpg = base / "JPEGImages" / f"{i}.jpg"
        if not jpg.is_file():
            raise VOCError(f"image {jpg} listed in {ids_file} is missing")
        images.append(VOCImage(i, jpg, *_parse(base / "Annotations" / f"{i}.xml", tuple(classes))))
    return images
