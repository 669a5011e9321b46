"""Decoding videos into frames resized to the mining resolution, with PyAV or OpenCV.

Both yield BGR uint8 frames (OpenCV's order) of exactly height x width. PyAV resizes inside
libswscale on the decoded picture, which `bench/mine.py` measures as the faster of the two. The
miner reads `Picture`s instead, which convert a frame only when a stage needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

DECODERS = ("pyav", "opencv")


class VideoError(RuntimeError):
    """A video that cannot be mined. `reason` is a short code stored in failures/*.parquet."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError("missing", f"{path} does not exist")
    if not path.is_file():
        raise VideoError("not_a_file", f"{path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError("empty_file", f"{path} has zero bytes")


class Picture:
    """One decoded frame, converted only as far as a stage asks, each conversion once. Most frames
    are only checked for a shot cut, which needs luma, not a height x width BGR image; scaling and
    colour conversion cost over twice the decoding itself (measured on the opencv-doc files: 0.3 ms
    to decode a frame, 0.6 ms more to scale it to 600x448 BGR)."""

    def __init__(self, convert: Callable[[], np.ndarray], luma: Callable[[], np.ndarray] | None = None) -> None:
        self._convert, self._luma = convert, luma
        self._bgr: np.ndarray | None = None
        self._gray: np.ndarray | None = None

    def bgr(self) -> np.ndarray:
        """The frame as the miner reads it: BGR uint8 [height, width, 3]."""
        if self._bgr is None:
            self._bgr = self._convert()
        return self._bgr

    def gray(self) -> np.ndarray:
        """The grey of `bgr()` (what interest points and motion are measured on)."""
        if self._gray is None:
            self._gray = cv2.cvtColor(self.bgr(), cv2.COLOR_BGR2GRAY)
        return self._gray

    def luma(self) -> np.ndarray:
        """A grey image of the whole picture at whatever resolution is cheapest: the decoder's own
        luma plane where it has one, else `gray()`."""
        return self._luma() if self._luma is not None else self.gray()


# Pixel formats whose first plane is 8-bit luma at the picture's full size.
_LUMA_FIRST = frozenset(
    {
        "yuv420p",
        "yuvj420p",
        "yuv422p",
        "yuvj422p",
        "yuv444p",
        "yuvj444p",
        "yuv440p",
        "yuvj440p",
        "yuv411p",
        "yuv410p",
        "nv12",
        "nv21",
        "gray",
    }
)


def _luma_plane(frame) -> np.ndarray:
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: frame.height, : frame.width]


def _pyav_pictures(path: Path, height: int, width: int) -> Iterator[Picture]:
    import av  # imported here so that the OpenCV path works without PyAV's libraries loaded
    from av.video.reformatter import VideoReformatter

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError("unreadable", f"{path}: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoError("no_video_stream", f"{path} holds no video stream")
        stream = container.streams.video[0]
        # One process per core does the parallelism; decoder threads would only contend.
        stream.thread_count = 1
        # One scaler for the whole video, single-threaded: `frame.to_ndarray(width=...)` builds a
        # new SwsContext (filter tables included) for every frame and lets it start a thread per
        # core, which cost ~0.7 ms of CPU per 600x448 frame on the opencv-doc files (about as much
        # as the scaling itself) and spun a second core. Same swscale settings, same pixels.
        scaler = VideoReformatter()

        def converter(frame) -> Callable[[], np.ndarray]:
            def convert() -> np.ndarray:
                try:
                    return scaler.reformat(
                        frame, width=width, height=height, format="bgr24", interpolation="AREA", threads=1
                    ).to_ndarray()
                except av.error.FFmpegError as e:
                    raise VideoError("damaged", f"{path}: converting a frame failed with {e}") from None

            return convert

        try:
            for frame in container.decode(stream):
                luma = (lambda frame=frame: _luma_plane(frame)) if frame.format.name in _LUMA_FIRST else None
                yield Picture(converter(frame), luma)
        except av.error.FFmpegError as e:
            raise VideoError("damaged", f"{path}: decoding stopped with {e}") from None


def _opencv_pictures(path: Path, height: int, width: int) -> Iterator[Picture]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError("unreadable", f"OpenCV cannot open {path} as a video")
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            if frame.shape[:2] != (height, width):
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            yield Picture(lambda frame=frame: frame)
    finally:
        cap.release()


def read_pictures(path: str | Path, height: int = 448, width: int = 600, decoder: str = "pyav") -> Iterator[Picture]:
    """The frames of `path`, each converted on demand (`Picture`); raises VideoError for input it cannot use."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
    path = Path(path)
    _check_file(path)
    pictures = _pyav_pictures if decoder == "pyav" else _opencv_pictures
    return pictures(path, height, width)


def read_frames(path: str | Path, height: int = 448, width: int = 600, decoder: str = "pyav") -> Iterator[np.ndarray]:
    """Frames of `path` as BGR uint8 [height, width, 3]; raises VideoError for input it cannot use."""
    return map(Picture.bgr, read_pictures(path, height, width, decoder))
