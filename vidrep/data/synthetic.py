"""Procedural videos with known ground truth: textured objects moving over a panning background.

Deterministic by seed. Frames are BGR uint8 (as OpenCV decodes video), 448x600 (h x w) by default.
`boxes(t)` gives each object's true box and `shapes` its class, so tests, the demo corpus and the
demo's probe know what moved where.

The changes along a track that a representation should ignore are options (off by default, so the
miner's tests see the plain world): `palette="shared"` draws every colour from one small palette
common to all videos (colour then says nothing about which video or object), `spin` turns each
object, `breathe` scales it up and down, `lighting` changes the brightness and colour cast of the
whole frame over time (so a patch 30 frames later has other colours).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "ellipse", "diamond")
# The shared palette: 12 colours fixed once for every video (BGR).
PALETTE = np.random.default_rng(20261205).uniform(20, 235, size=(12, 3)).astype(np.float32)


def _colours(rng: np.random.Generator, n: int, palette: str) -> np.ndarray:
    """[n, 3] float32 colours: uniform at random ("own": each video its own), or picked from PALETTE
    with a little jitter ("shared")."""
    if palette == "own":
        return rng.uniform(20, 235, size=(n, 3)).astype(np.float32)
    if palette == "shared":
        picked = PALETTE[rng.choice(len(PALETTE), size=n, replace=n > len(PALETTE))]
        return np.clip(picked + rng.normal(0, 8, size=(n, 3)), 0, 255).astype(np.float32)
    raise ValueError(f"unknown palette {palette!r}; choose 'own' or 'shared'")


def _smooth_texture(rng: np.random.Generator, height: int, width: int, cell: int, contrast: float) -> np.ndarray:
    """Coloured value noise: coarse random colours upsampled, plus fine grain (float32 BGR)."""
    coarse = rng.uniform(0, 255, size=(max(2, height // cell), max(2, width // cell), 3)).astype(np.float32)
    base = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 255 * contrast, size=(height, width, 1)).astype(np.float32)
    return np.clip(base + grain, 0, 255)


def _scene_texture(rng: np.random.Generator, height: int, width: int, palette: str = "own") -> np.ndarray:
    """A background: two colours mixed by smooth noise at two scales, plus static clutter."""
    colours = _colours(rng, 2, palette)
    coarse = _smooth_texture(rng, height, width, int(rng.integers(24, 64)), 0.0)[..., :1] / 255.0
    fine = _smooth_texture(rng, height, width, int(rng.integers(4, 10)), 0.03)[..., :1] / 255.0
    mix = np.clip(0.65 * coarse + 0.35 * fine, 0, 1)
    scene = colours[0] * mix + colours[1] * (1 - mix)
    # Static clutter with sharp corners: real scenes have corners off the moving objects too, and
    # without them every interest point lands on an object and the frame reads as camera motion.
    for _ in range(int(height * width / 5000)):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(6, 28, size=2))
        colour = tuple(float(v) for v in (rng.uniform(0, 255, 3) if palette == "own" else _colours(rng, 1, palette)[0]))
        if rng.random() < 0.5:
            cv2.rectangle(scene, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.ellipse(scene, (x, y), (w // 2, h // 2), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return scene


def _shape_mask(shape: str, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    c, r = size // 2, size // 2 - 1
    if shape == "circle":
        cv2.circle(mask, (c, c), r, 255, -1)
    elif shape == "square":
        mask[size // 8 : size - size // 8, size // 8 : size - size // 8] = 255
    elif shape == "triangle":
        cv2.fillPoly(mask, [np.array([[c, 0], [size - 1, size - 1], [0, size - 1]], np.int32)], 255)
    elif shape == "ellipse":
        cv2.ellipse(mask, (c, c), (r, r // 2 + 2), 30, 0, 360, 255, -1)
    elif shape == "diamond":
        cv2.fillPoly(mask, [np.array([[c, 0], [size - 1, c], [c, size - 1], [0, c]], np.int32)], 255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return mask


def _object_texture(rng: np.random.Generator, size: int, palette: str = "own") -> np.ndarray:
    if palette == "own":
        colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    else:
        colour_a, colour_b = _colours(rng, 2, palette)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    period = rng.uniform(6, 18)
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 1:  # checkerboard
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    else:  # blobs
        t = _smooth_texture(rng, size, size, 8, 0.0)[..., 0] / 255.0
    tex = colour_a * t[..., None] + colour_b * (1 - t[..., None])
    return np.clip(tex + rng.normal(0, 6, tex.shape), 0, 255).astype(np.float32)


def _bounce(start: np.ndarray, velocity: np.ndarray, t: float, limit: np.ndarray) -> np.ndarray:
    """Position of a point moving at constant velocity, reflected off the walls [0, limit]."""
    x = start + velocity * t
    period = 2 * np.maximum(limit, 1e-6)
    m = np.mod(x, period)
    return np.where(m <= limit, m, period - m)


class SyntheticVideo:
    """A procedural video. `pan` is the camera's motion in px/frame; `object_speed` the objects'.

    `spin`: each object turns at up to this many degrees per frame (either way); `breathe`: its size
    swings by up to this fraction (period 40-120 frames); `lighting`: the frame's brightness swings by
    up to this fraction and each colour channel by up to half of it (periods 90-200 frames: slow
    enough not to read as a shot cut).
    """

    def __init__(
        self,
        seed: int,
        num_frames: int = 120,
        height: int = 448,
        width: int = 600,
        num_objects: int = 2,
        object_size: tuple[int, int] = (70, 130),
        object_speed: tuple[float, float] = (1.5, 4.0),
        pan: tuple[float, float] | None = None,
        palette: str = "own",
        spin: float = 0.0,
        breathe: float = 0.0,
        lighting: float = 0.0,
    ) -> None:
        if num_frames < 1 or num_objects < 0:
            raise ValueError(f"need num_frames >= 1 and num_objects >= 0; got {num_frames}, {num_objects}")
        if not (spin >= 0 and 0 <= breathe < 1 and 0 <= lighting < 1):
            raise ValueError(f"need spin >= 0, 0 <= breathe < 1, 0 <= lighting < 1; got {spin}, {breathe}, {lighting}")
        rng = np.random.default_rng(seed)
        self.seed, self.num_frames, self.height, self.width = seed, num_frames, height, width
        if pan is None:
            angle = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(0.5, 2.0)
            pan = (speed * np.cos(angle), speed * np.sin(angle))
        self.pan = np.asarray(pan, np.float64)
        margin = np.ceil(np.abs(self.pan) * num_frames).astype(int) + 2
        self._bg = _scene_texture(rng, height + margin[1], width + margin[0], palette)
        self._bg_origin = np.where(self.pan < 0, margin - 1, 1).astype(np.float64)
        self.shapes, self._masks, self._textures = [], [], []
        starts, velocities, sizes = [], [], []
        for _ in range(num_objects):
            size = int(rng.integers(object_size[0], object_size[1] + 1))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            self.shapes.append(shape)
            self._masks.append(_shape_mask(shape, size).astype(np.float32)[..., None] / 255.0)
            self._textures.append(_object_texture(rng, size, palette))
            sizes.append(size)
            # the box holds the object at its largest, so that it stays inside the frame
            largest = int(np.ceil(size * (1 + breathe)))
            starts.append(rng.uniform([0, 0], [width - largest, height - largest]))
            angle = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(*object_speed)
            velocities.append([speed * np.cos(angle), speed * np.sin(angle)])
        self.sizes = np.asarray(sizes, np.int64)
        self._starts = np.asarray(starts, np.float64).reshape(-1, 2)
        self._velocities = np.asarray(velocities, np.float64).reshape(-1, 2)
        self.spin, self.breathe, self.lighting = spin, breathe, lighting
        # Drawn after everything above, so that the plain world (all three 0) is the same video
        # whatever they are set to in other worlds of the same seed.
        n = num_objects
        self._spin = rng.uniform(-1, 1, n) * spin
        self._angle0 = rng.uniform(0, 360, n) * (spin > 0)
        self._breathe = (rng.uniform(0.5, 1, n) * breathe, rng.uniform(40, 120, n), rng.uniform(0, 2 * np.pi, n))
        self._light = (rng.uniform(0.5, 1, 4) * lighting, rng.uniform(90, 200, 4), rng.uniform(0, 2 * np.pi, 4))

    def __len__(self) -> int:
        return self.num_frames

    def _scales(self, t: int) -> np.ndarray:
        amplitude, period, phase = self._breathe
        return 1 + amplitude * np.sin(2 * np.pi * t / period + phase)

    def boxes(self, t: int) -> np.ndarray:
        """[num_objects, 4] int boxes (x, y, w, h) of each object in frame t."""
        largest = np.ceil(self.sizes * (1 + self.breathe)).astype(np.int64)
        limit = np.stack([self.width - largest, self.height - largest], axis=1).astype(np.float64)
        centre = _bounce(self._starts, self._velocities, t, limit) + largest[:, None] / 2
        side = np.rint(self.sizes * self._scales(t)).astype(np.int64)
        pos = np.rint(centre - side[:, None] / 2).astype(np.int64)
        pos = np.clip(pos, 0, np.stack([self.width - side, self.height - side], axis=1))
        return np.concatenate([pos, side[:, None], side[:, None]], axis=1)

    def _light_gain(self, t: int) -> np.ndarray:
        """[3] per-channel gain of frame t: a shared brightness swing times a per-channel cast."""
        amplitude, period, phase = self._light
        swing = amplitude * np.sin(2 * np.pi * t / period + phase)
        return ((1 + swing[0]) * (1 + 0.5 * swing[1:])).astype(np.float32)

    def frame(self, t: int) -> np.ndarray:
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame {t} outside 0..{self.num_frames - 1}")
        ox, oy = self._bg_origin + self.pan * t
        shift = np.float32([[1, 0, -ox], [0, 1, -oy]])
        img = cv2.warpAffine(self._bg, shift, (self.width, self.height), flags=cv2.INTER_LINEAR)
        turned = self.spin or self.breathe
        for i, ((x, y, s, _), mask, tex) in enumerate(zip(self.boxes(t), self._masks, self._textures)):
            if turned:
                size = len(mask)
                # rotate about the object's centre and scale it to the box's side s
                m = cv2.getRotationMatrix2D(
                    ((size - 1) / 2, (size - 1) / 2), self._angle0[i] + self._spin[i] * t, s / size
                )
                m[:, 2] += (s - size) / 2
                tex = cv2.warpAffine(tex, m, (s, s), flags=cv2.INTER_LINEAR)
                mask = cv2.warpAffine(mask[..., 0], m, (s, s), flags=cv2.INTER_LINEAR)[..., None]
            region = img[y : y + s, x : x + s]
            region[:] = mask * tex + (1 - mask) * region
        if self.lighting:
            img = np.clip(img * self._light_gain(t), 0, 255)
        return img.astype(np.uint8)

    def frames(self) -> Iterator[np.ndarray]:
        for t in range(self.num_frames):
            yield self.frame(t)

    def write(self, path: str | Path, fps: float = 25.0, fourcc: str = "MJPG") -> Path:
        """Encode to a video file (MJPG in .avi works with the PyPI OpenCV wheels)."""
        path = Path(path)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (self.width, self.height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path} with codec {fourcc}; try fourcc='MJPG' and a .avi name")
        try:
            for img in self.frames():
                writer.write(img)
        finally:
            writer.release()
        return path
