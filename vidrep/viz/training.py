"""Pictures of what the network learned: triplets with their similarities, nearest-neighbour
retrieval across videos, conv1 filters, the patches that excite pool5 units most (the paper's "top
response regions" figure) and a 2-D map of the embedding coloured by video.

Selection is separated from drawing: the `*_indices`/`choose_*` functions are pure tensor maths
(tested against brute force); the `*_figure` functions only draw what they are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vidrep.viz.canvas import figure_to_array, patch_grid, pyplot, wrap


def hardest_chosen_negative(anchor: Tensor, positive: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair, of the negatives the loss chose (`mask` [N, 2N] over cat(anchor, positive)), the
    one most similar to the anchor: (index into the 2N patches, -1 if none; s(a, p); s(a, n))."""
    patches = torch.cat([anchor, positive])
    s_an = (anchor @ patches.T).masked_fill(~mask, float("-inf"))
    s_neg, index = s_an.max(dim=1)
    none = ~mask.any(dim=1)
    return index.masked_fill(none, -1), (anchor * positive).sum(1), s_neg.masked_fill(none, float("nan"))


def cross_video_neighbours(
    queries: Tensor, query_videos: Tensor, gallery: Tensor, gallery_videos: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The k gallery items most similar to each query among those of other videos: (indices [Q, k],
    similarities [Q, k]), most similar first; -1 / NaN where fewer than k are eligible."""
    sim = (queries @ gallery.T).masked_fill(query_videos[:, None] == gallery_videos[None, :], float("-inf"))
    k_eff = min(k, gallery.shape[0])
    values, indices = sim.topk(k_eff, dim=1)
    missing = torch.isinf(values)
    indices, values = indices.masked_fill(missing, -1), values.masked_fill(missing, float("nan"))
    if k_eff < k:
        pad = k - k_eff
        indices = torch.cat([indices, indices.new_full((len(queries), pad), -1)], 1)
        values = torch.cat([values, values.new_full((len(queries), pad), float("nan"))], 1)
    return indices, values


def unit_responses(pool5: Tensor, channels: int = 256) -> Tensor:
    """[N, channels] response of each pool5 unit (channel): its maximum over positions."""
    return pool5.reshape(pool5.shape[0], channels, -1).amax(dim=2)


def top_response_indices(
    responses: Tensor, num_units: int, k: int, groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The `num_units` units with the largest peak response, and for each the k patches that excite
    it most, at most one per group (video) when `groups` is given, so that a unit's row shows what
    it responds to across videos rather than one video's consecutive frames: (units [U], patch
    indices [U, k], strongest first; -1 where fewer than k groups exist)."""
    num_units = min(num_units, responses.shape[1])
    units = responses.amax(dim=0).topk(num_units).indices
    if groups is None:
        groups = torch.arange(responses.shape[0])
    out = torch.full((num_units, k), -1, dtype=torch.long)
    for row, unit in enumerate(units.tolist()):
        order = torch.argsort(responses[:, unit], descending=True, stable=True)
        _, first = np.unique(groups[order].numpy(), return_index=True)
        best = order[np.sort(first)][:k]
        out[row, : len(best)] = best
    return units, out


def first_conv_weight(trunk: nn.Module) -> Tensor:
    conv = next((m for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(trunk).__name__} has no convolution to draw")
    return conv.weight.detach().float().cpu()


def filter_mosaic(weight: Tensor, columns: int = 12, scale: int = 4, gap: int = 2) -> np.ndarray:
    """conv1 filters [F, 3, k, k] as one RGB image: each filter scaled on its own so that 0 is mid
    grey and its largest |weight| is black or white (colour and structure are visible whatever the
    filter's norm), enlarged `scale` times without smoothing, on a white background."""
    f, _, kh, kw = weight.shape
    w = weight / weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    tiles = ((w * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-f // columns)
    th, tw = kh * scale, kw * scale
    out = np.full((rows * (th + gap) + gap, columns * (tw + gap) + gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[gap + r * (th + gap) : gap + r * (th + gap) + th, gap + c * (tw + gap) : gap + c * (tw + gap) + tw] = tile
    return out


def embed_2d(x: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """[N, D] -> [N, 2] by t-SNE (cosine, the embedding's own similarity) or PCA."""
    if method == "pca" or len(x) < 8:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x) if len(x) >= 2 else np.zeros((len(x), 2))
    if method != "tsne":
        raise ValueError(f"unknown embedding method {method!r}; choose tsne or pca")
    from sklearn.manifold import TSNE

    perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(x)


# --- drawing -------------------------------------------------------------------------------------


def triplet_figure(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    sim_pos: Sequence[float],
    sim_neg: Sequence[float],
    margin: float,
    title: str,
) -> np.ndarray:
    """One row per pair: query, tracked patch, the hardest negative the loss chose; similarities
    (cosine of the embeddings) under the patches, red where the triplet violates the margin."""
    rows, texts, colours = [], [], []
    for a, p, n, sp, sn in zip(anchor, positive, negative, sim_pos, sim_neg):
        bad = not np.isnan(sn) and sp - sn < margin
        rows.append([a, p, n])
        texts.append(["", f"s(q,t) = {sp:.3f}", "no negative" if np.isnan(sn) else f"s(q,n) = {sn:.3f}"])
        colours.append(["black", "black", "red" if bad else "green"])
    return patch_grid(
        rows,
        texts,
        ["query", "tracked (positive)", "chosen negative"],
        f"{title}\ns: cosine similarity of the embeddings; red: s(q,t) - s(q,n) < margin {margin:g} "
        "(the triplet still costs loss)",
        colours,
    )


def retrieval_figure(
    queries: Tensor,
    matches: Sequence[Sequence],
    sims: np.ndarray,
    query_videos: Sequence[int],
    match_videos: np.ndarray,
    title: str,
) -> np.ndarray:
    """One row per held-out query: the query, then its nearest patches from other videos."""
    k = sims.shape[1]
    rows = [[q, *m] for q, m in zip(queries, matches)]
    texts = [
        [f"video {v % 10000:04d}"]
        + [("" if np.isnan(s) else f"s = {s:.2f}, v {mv % 10000:04d}") for s, mv in zip(srow, vrow)]
        for v, srow, vrow in zip(query_videos, sims, match_videos)
    ]
    return patch_grid(
        rows,
        texts,
        ["query"] + [f"match {i + 1}" for i in range(k)],
        f"{title}\nnearest held-out patches from other videos (s: cosine similarity; v: last 4 digits of the video id)",
    )


def filters_figure(weight: Tensor, title: str) -> np.ndarray:
    plt = pyplot()
    mosaic = filter_mosaic(weight)
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 80 + 0.4, mosaic.shape[0] / 80 + 0.8))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    ax.set_title(
        wrap(
            f"{title}\n{weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]} (RGB); each scaled to its own "
            "max |w|, grey = 0",
            int(13 * fig.get_figwidth()),
        ),
        fontsize=9,
    )
    fig.tight_layout()
    return figure_to_array(fig)


def top_response_figure(
    patches: Sequence[Sequence], units: Sequence[int], responses: np.ndarray, title: str
) -> np.ndarray:
    """One row per pool5 unit: the held-out patches with its strongest responses."""
    texts = [["" if np.isnan(r) else f"{r:.2f}" for r in row] for row in responses]
    return patch_grid(
        patches,
        texts,
        [f"#{i + 1}" for i in range(len(patches[0]))],
        f"{title}\nheld-out patches that excite each pool5 unit most, one per video (value: the unit's peak response)",
        row_labels=[f"unit {u}" for u in units],
    )


def embedding_figure(
    xy: np.ndarray, video_ids: np.ndarray, pair_of: np.ndarray | None, method: str, title: str
) -> np.ndarray:
    """Held-out patches in 2-D, one colour per video (colours repeat beyond 20 videos); grey lines
    join the query and the tracked patch of each pair."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    _, colour_index = np.unique(video_ids, return_inverse=True)
    if pair_of is not None:
        for i, j in enumerate(pair_of):
            if j > i:
                ax.plot(xy[[i, j], 0], xy[[i, j], 1], color="0.75", linewidth=0.5, zorder=1)
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=colour_index % 20,
        cmap="tab20",
        vmin=0,
        vmax=19,
        s=14,
        zorder=2,
        edgecolors="black",
        linewidths=0.2,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    n_videos = int(colour_index.max()) + 1 if len(colour_index) else 0
    ax.set_title(
        wrap(
            f"{title}\n{len(xy)} held-out patches of {n_videos} videos; colour = video"
            f"{' (20 colours, repeated)' if n_videos > 20 else ''}; lines join tracked pairs",
            110,
        ),
        fontsize=9,
    )
    fig.tight_layout()
    return figure_to_array(fig)
