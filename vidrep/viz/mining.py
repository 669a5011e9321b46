"""Pictures of what the miner found: per video, the query frame with its interest points (moving
ones marked), the chosen 227x227 window and the tracked box `track_length` frames later; and a
contact sheet of the video's mined pairs.

The frame picture re-runs the miner's own point and motion stage (`VideoMiner.frame_motion`) on
the decoded frames, so it shows exactly what the miner measured; it needs the video file. The
contact sheet needs only the corpus.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from vidrep.data.corpus import PairIndex, read_manifest
from vidrep.mining.decode import read_frames
from vidrep.mining.miner import MinerConfig, VideoMiner
from vidrep.viz.canvas import figure_to_array, patch_grid, pyplot, save_png, wrap

log = logging.getLogger(__name__)


def frames_at(path: str | Path, config: MinerConfig, wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """BGR frames of `path` at the indices `wanted`, decoded and resized as the miner does."""
    wanted = set(wanted)
    out = {}
    for t, frame in enumerate(read_frames(path, config.height, config.width, config.decoder)):
        if t in wanted:
            out[t] = frame
        if len(out) == len(wanted):
            break
    return out


def _box(ax, box, colour: str, style: str = "-", label: str | None = None) -> None:
    from matplotlib.patches import Rectangle

    x, y, w, h = box
    ax.add_patch(
        Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, linewidth=2, linestyle=style, label=label)
    )


def mining_frame_figure(
    query: np.ndarray,
    tracked: np.ndarray,
    points: np.ndarray,
    moving: np.ndarray,
    query_box: Sequence[int],
    tracked_box: Sequence[int],
    title: str,
    query_frame: int,
    tracked_frame: int,
) -> np.ndarray:
    """Query frame (points, moving in red, the window) beside the tracked frame (the tracked box and,
    dashed, where the window was). Frames are BGR as decoded."""
    plt = pyplot()
    h, w = query.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 12 * h / (2 * w) + 1.1))
    ax = axes[0]
    ax.imshow(cv2.cvtColor(query, cv2.COLOR_BGR2RGB))
    static = ~moving
    ax.scatter(
        points[static, 0],
        points[static, 1],
        s=9,
        c="#00e5ff",
        edgecolors="black",
        linewidths=0.3,
        label=f"static after camera compensation ({int(static.sum())})",
    )
    ax.scatter(
        points[moving, 0],
        points[moving, 1],
        s=12,
        c="red",
        edgecolors="black",
        linewidths=0.3,
        label=f"moving ({int(moving.sum())})",
    )
    _box(ax, query_box, "yellow", label=f"{query_box[2]}x{query_box[3]} query window")
    ax.set_title(f"frame {query_frame}: {len(points)} interest points, {100 * moving.mean():.0f} % moving", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=8, frameon=False)
    ax = axes[1]
    ax.imshow(cv2.cvtColor(tracked, cv2.COLOR_BGR2RGB))
    _box(ax, query_box, "yellow", "--", label="query window (frame %d)" % query_frame)
    _box(ax, tracked_box, "lime", label="tracked box")
    ax.set_title(
        f"frame {tracked_frame}: the window tracked by KCF ({tracked_frame - query_frame} frames later)", fontsize=10
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=8, frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(wrap(title, 150), fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def contact_sheet(
    queries: Sequence[np.ndarray],
    tracked: Sequence[np.ndarray],
    frames: Sequence[tuple[int, int]],
    title: str,
    pairs_per_row: int = 4,
) -> np.ndarray:
    """The pairs of one video, `pairs_per_row` (query, tracked) pairs per row, frame numbers below."""
    rows, texts = [], []
    for start in range(0, len(queries), pairs_per_row):
        row, text = [], []
        for q, t, (fq, ft) in zip(
            queries[start : start + pairs_per_row],
            tracked[start : start + pairs_per_row],
            frames[start : start + pairs_per_row],
        ):
            row += [q, t]
            text += [f"query, frame {fq}", f"tracked, frame {ft}"]
        rows.append(row + [None] * (2 * pairs_per_row - len(row)))
        texts.append(text + [""] * (2 * pairs_per_row - len(text)))
    columns = ["query", "tracked"] * min(pairs_per_row, len(queries))
    return patch_grid(rows, texts, columns, title)


def _rgb(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def picture_folder(name: str, key: str) -> str:
    """A video's picture folder: its file name (readable) and its id (unique among same-named files)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:60]
    return f"{stem}-{key}"


def render_corpus_pictures(
    root: str | Path,
    out: str | Path | None = None,
    *,
    max_videos: int = 8,
    max_pairs: int = 24,
    video_paths: dict[str, Path] | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Per video with pairs (the first `max_videos` by corpus key, or those `names`): a contact sheet
    of up to `max_pairs` pairs (<out>/<name>-<key>/pairs.png) and, where `video_paths` maps the video's
    corpus name to its file, the frame picture of its first pair (<out>/<name>-<key>/frame.png).
    `out` defaults to <root>/pictures. Returns the files written."""
    root = Path(root)
    out = root / "pictures" if out is None else Path(out)
    manifest = read_manifest(root)
    settings = root / "mining.json"
    config = None
    if settings.exists():
        import json

        config = MinerConfig.from_corpus_settings(json.loads(settings.read_text()))
    index = PairIndex(root, manifest)
    # Ids sort as the corpus keys (fixed-width hex of the same non-negative ints) sort. Only the
    # chosen videos' rows are converted to Python below: a corpus holds millions of pairs.
    ids, first = np.unique(index.video_id, return_index=True)
    chosen = list(zip(ids.tolist(), manifest.column("video").take(first).to_pylist()))
    if names is not None:
        wanted = set(names)
        unknown = sorted(wanted - {n for _, n in chosen})
        if unknown:
            log.info("corpus %s has no pairs of %d of the videos asked for (e.g. %s)", root, len(unknown), unknown[0])
        chosen = [(i, n) for i, n in chosen if n in wanted]
    chosen = chosen[:max_videos]
    miner = VideoMiner(config) if config is not None and video_paths else None
    written = []
    for video_id, name in chosen:
        rows = np.nonzero(index.video_id == video_id)[0]
        rows = rows[np.argsort(index.query_frame[rows], kind="stable")]
        pairs_of_video = (
            manifest.take(rows).select(["query_frame", "tracked_frame", "query_box", "tracked_box"]).to_pylist()
        )
        key = f"{video_id:016x}"
        folder = picture_folder(name, key)
        shown = rows[:max_pairs]
        pairs = [index.read_pair(int(i)) for i in shown]
        what = f"{len(shown)} of {len(rows)}" if len(rows) > len(shown) else f"all {len(rows)}"
        sheet = contact_sheet(
            [_rgb(q) for q, _ in pairs],
            [_rgb(t) for _, t in pairs],
            [(p["query_frame"], p["tracked_frame"]) for p in pairs_of_video[: len(shown)]],
            f"{name} (video {key}): {what} mined pairs, query and tracked patch",
        )
        written.append(save_png(out / folder / "pairs.png", sheet))
        path = (video_paths or {}).get(name)
        if miner is None or path is None:
            continue
        p = pairs_of_video[0]
        try:
            written.append(
                save_png(
                    out / folder / "frame.png",
                    video_frame_picture(
                        miner, path, name, p["query_frame"], p["tracked_frame"], p["query_box"], p["tracked_box"]
                    ),
                )
            )
        except Exception as e:  # noqa: BLE001 - a picture must not end a run; say which video and why
            log.warning("no frame picture for %s: %s: %s", name, type(e).__name__, e)
    if not chosen:
        log.warning("corpus %s has no pairs to draw", root)
    return written


def video_frame_picture(
    miner: VideoMiner,
    path: str | Path,
    name: str,
    query_frame: int,
    tracked_frame: int,
    query_box: Sequence[int],
    tracked_box: Sequence[int],
) -> np.ndarray:
    """The frame picture of one pair, re-measuring the points and motion the miner saw."""
    c = miner.config
    frames = frames_at(path, c, [query_frame - 1, query_frame, tracked_frame])
    if len(frames) < 3:
        raise ValueError(
            f"{path} has fewer than {tracked_frame + 1} frames; is it the video this corpus was mined from?"
        )
    gray = lambda t: cv2.cvtColor(frames[t], cv2.COLOR_BGR2GRAY)  # noqa: E731
    motion = miner.frame_motion(gray(query_frame - 1), gray(query_frame))
    moving = motion.residual > c.moving_px
    return mining_frame_figure(
        frames[query_frame],
        frames[tracked_frame],
        motion.points,
        moving,
        query_box,
        tracked_box,
        f"{name}: a mined pair (detector {c.detector}; a point moves when its camera-compensated "
        f"motion exceeds {c.moving_px:g} px; frames kept with {100 * c.min_moving:.0f}-"
        f"{100 * c.max_moving:.0f} % moving)",
        query_frame,
        tracked_frame,
    )


def draw_run_pictures(cfg) -> None:
    """Pictures of this run's share of the videos (its shard), never of other shards' videos."""
    from vidrep.mining.inputs import list_videos, select_shard

    videos = select_shard(list_videos(cfg.videos, tuple(cfg.extensions)), cfg.shard, cfg.num_shards)
    written = render_corpus_pictures(
        cfg.out, max_videos=cfg.viz_videos, names=[v.name for v in videos], video_paths={v.name: v.path for v in videos}
    )
    print(f"pictures: {len(written)} files in {Path(cfg.out).resolve() / 'pictures'}")
