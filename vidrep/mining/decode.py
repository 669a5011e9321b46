"""Decoding videos into frames resized to the mining resolution, with PyAV or OpenCV.

Both yield BGR uint8 frames (OpenCV's order) of exactly height x width. PyAV resizes inside
libswscale on the decoded picture, which `bench/mine.py` measures as the faster of the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def _pyav_frames(path: Path, height: int, width: int) -> Iterator[np.ndarray]:
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
        try:
            for frame in container.decode(stream):
                yield scaler.reformat(frame, width=width, height=height, format="bgr24", interpolation="AREA", threads=1).to_ndarray()
        except av.error.FFmpegError as e:
            raise VideoError("damaged", f"{path}: decoding stopped with {e}") from None


def _opencv_frames(path: Path, height: int, width: int) -> Iterator[np.ndarray]:
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
            yield frame
    finally:
        cap.release()


def read_frames(path: str | Path, height: int = 448, width: int = 600, decoder: str = "pyav") -> Iterator[np.ndarray]:
    """Frames of `path` as BGR uint8 [height, width, 3]; raises VideoError for input it cannot use."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
    path = Path(path)
    _check_file(path)
    frames = _pyav_frames if decoder == "pyav" else _opencv_frames
    return frames(path, height, width)
