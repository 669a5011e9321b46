"""A VOC-format data set drawn from the synthetic video world: objects of each shape class (new
textures and colours, never seen in the demo videos) pasted on new backgrounds, with boxes and a
few `difficult` flags. Used by the tests and by the demo's frozen-feature check."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from vidrep.data.synthetic import SHAPES, _object_texture, _scene_texture, _shape_mask


def _xml(image_id: str, width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> str:
    parts = [
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    ]
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def write_synthetic_voc(
    root: str | Path,
    num_trainval: int = 60,
    num_test: int = 60,
    seed: int = 12345,
    height: int = 240,
    width: int = 320,
    max_objects: int = 2,
    difficult_p: float = 0.1,
    classes: tuple[str, ...] = SHAPES,
    year: int = 2007,
) -> Path:
    """Write <root>/VOC<year>: for 2007 the trainval and test splits (num_trainval, num_test images);
    for a later year VOC2012's layout, train and val (num_trainval, num_test images) and trainval =
    train + val. Built in a temporary folder and renamed; an existing tree is reused only when its
    split sizes are the ones asked for."""
    root = Path(root)
    final = root / f"VOC{year}"
    names = ("trainval", "test") if int(year) == 2007 else ("train", "val")
    if final.exists():
        sizes = [len((final / "ImageSets" / "Main" / f"{split}.txt").read_text().split()) for split in names]
        if sizes != [num_trainval, num_test]:
            raise ValueError(
                f"{final} holds {sizes[0]} {names[0]} and {sizes[1]} {names[1]} images, not {num_trainval} and "
                f"{num_test}; give this size its own folder, or delete {final}"
            )
        return root
    tmp = root / f".VOC{year}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {names[0]: [], names[1]: []}
    for n in range(num_trainval + num_test):
        image_id = f"{n:06d}"
        img = _scene_texture(rng, height, width)
        objects = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            name = classes[int(rng.integers(len(classes)))]
            size = int(rng.integers(min(height, width) // 4, min(height, width) // 2))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            mask = _shape_mask(name, size).astype(np.float32)[..., None] / 255.0
            region = img[y : y + size, x : x + size]
            region[:] = mask * _object_texture(rng, size) + (1 - mask) * region
            ys, xs = np.nonzero(mask[..., 0] > 0.5)
            objects.append(
                (
                    name,
                    (x + xs.min() + 1, y + ys.min() + 1, x + xs.max() + 1, y + ys.max() + 1),
                    bool(rng.random() < difficult_p),
                )
            )
        cv2.imwrite(str(tmp / "JPEGImages" / f"{image_id}.jpg"), img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        (tmp / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, width, height, objects))
        splits[names[0] if n < num_trainval else names[1]].append(image_id)
    if names[0] == "train":
        splits["trainval"] = splits["train"] + splits["val"]
    for split, ids in splits.items():
        (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (tmp / MARKER).write_text(
        json.dumps(
            {
                "generator": "vidrep.data.synthetic_voc",
                "seed": seed,
                "classes": list(classes),
                "trainval": num_trainval,
                "test": num_test,
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(tmp, final)
    return root


# Marks a tree as synthetic, so that its results are never labelled as PASCAL VOC.
MARKER = "synthetic.json"


def is_synthetic(root: str | Path, year: int | str) -> bool:
    return (Path(root).expanduser() / f"VOC{year}" / MARKER).exists()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vidrep.data.synthetic_voc",
        description="Write a synthetic VOC-format set (<out>/VOC2007, trainval and test) of the "
        "demo world's shape classes, for trying evaluate.py without PASCAL VOC.",
    )
    parser.add_argument("out", help="folder to write (it gets VOC2007/ inside)")
    parser.add_argument("--trainval", type=int, default=150, help="trainval images (default 150)")
    parser.add_argument("--test", type=int, default=150, help="test images (default 150)")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    root = write_synthetic_voc(args.out, num_trainval=args.trainval, num_test=args.test, seed=args.seed)
    print(
        f"synthetic VOC-format set: {Path(root).resolve() / 'VOC2007'} ({args.trainval} trainval, {args.test} test "
        "images)\n"
        f"evaluate on it: python evaluate.py ckpt=<checkpoint> voc.root={root} voc.classes='[{','.join(SHAPES)}]'"
    )


if __name__ == "__main__":
    main()
