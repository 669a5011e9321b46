"""Pictures of evaluation results, drawn from results.json alone (so they can be redrawn later):
per-class AP bars (one bar per evaluation), precision-recall curves per class, and the table of
several evaluations beside the paper's figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vidrep.eval.report import data_name
from vidrep.viz.canvas import PictureSink, figure_to_array, pyplot, wrap


def _best(result: dict) -> dict:
    return result["layers"][result["best_layer"]]


def _name(result: dict) -> str:
    return f"{result['label']} ({result['best_layer']})"


def ap_bar_chart(results: Sequence[dict], title: str = "") -> np.ndarray:
    """Grouped bars: per class, the AP of each evaluation's best layer; mAP in the legend."""
    plt = pyplot()
    classes = results[0]["data"]["classes"]
    for r in results[1:]:
        if r["data"]["classes"] != classes:
            raise ValueError(f"results to compare must share their classes: {r['label']} has {r['data']['classes']}")
    n = len(results)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(classes) * max(1, n / 2) + 2), 4.2))
    x = np.arange(len(classes))
    for i, r in enumerate(results):
        ap = np.array([np.nan if a is None else a for a in _best(r)["ap"]], dtype=float) * 100
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(ap), width, label=f"{_name(r)}: mAP {100 * r['map']:.1f}")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.25 if len(classes) > 6 else -0.12), ncol=1, frameon=False
    )
    metric = "11-point" if results[0]["protocol"].get("use_07_metric") else "all-point"
    ax.set_title(
        wrap(
            title
            or f"per-class AP ({results[0]['protocol']['name']} protocol, {data_name(results[0])} "
            f"{results[0]['data']['test_split']}, {metric} AP)",
            110,
        ),
        fontsize=10,
    )
    fig.tight_layout()
    return figure_to_array(fig)


def pr_curves_figure(result: dict, columns: int = 5) -> np.ndarray:
    """One small plot per class: the test precision-recall curve of the best layer, AP in its title."""
    plt = pyplot()
    layer = _best(result)
    per_class = layer.get("classes") or []
    classes = result["data"]["classes"]
    rows = math.ceil(len(classes) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.2 * rows + 0.8), squeeze=False)
    for c, name in enumerate(classes):
        ax = axes[c // columns][c % columns]
        curve = per_class[c].get("pr") if c < len(per_class) else None
        ap = layer["ap"][c]
        if curve and curve["recall"]:
            ax.plot(curve["recall"], curve["precision"], linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "no curve", ha="center", va="center", fontsize=8, color="0.5")
        ax.set_title(f"{name}: AP {'-' if ap is None or np.isnan(ap) else f'{100 * ap:.1f}'}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if c % columns == 0:
            ax.set_ylabel("precision", fontsize=8)
        if c // columns == rows - 1 or c + columns >= len(classes):
            ax.set_xlabel("recall", fontsize=8)
    for c in range(len(classes), rows * columns):
        axes[c // columns][c % columns].axis("off")
    fig.suptitle(
        wrap(
            f"precision-recall on {data_name(result)} {result['data']['test_split']}: {_name(result)}, "
            f"mAP {100 * result['map']:.1f}",
            int(13 * fig.get_figwidth()),
        ),
        fontsize=10,
    )
    fig.tight_layout()
    return figure_to_array(fig)


def table_image(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> np.ndarray:
    """A table as a picture (for W&B and slides); the same rows as the Markdown table."""
    plt = pyplot()
    widths = (
        [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
        if rows
        else [len(h) for h in header]
    )
    fig, ax = plt.subplots(figsize=(min(22, 0.09 * sum(widths) + 1.5), 0.32 * (len(rows) + 1) + 0.9))
    ax.axis("off")
    table = ax.table(
        cellText=[list(map(str, r)) for r in rows] or [["-"] * len(header)],
        colLabels=list(header),
        loc="center",
        cellLoc="left",
        colWidths=[w / sum(widths) for w in widths],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    ax.set_title(wrap(title, 140), fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def evaluation_pictures(result: dict, sink: PictureSink) -> None:
    """The pictures of one evaluation: per-class AP bars and PR curves."""
    sink.add("pictures/per_class_ap", ap_bar_chart([result]), f"per-class AP: {result['label']}")
    sink.add("pictures/pr_curves", pr_curves_figure(result), f"precision-recall per class: {result['label']}")


def draw_evaluation(result: dict, folder: Path) -> list[Path]:
    """evaluate.py's pictures of one run in `folder`; returns the files written."""
    sink = PictureSink(folder)
    evaluation_pictures(result, sink)
    return sink.written


def comparison_pictures(results: Sequence[dict], paths: Sequence[Path], sink: PictureSink) -> None:
    """Several evaluations side by side: the paper-table image (the rows of `report.gather`), and
    per-class AP bars when they share their classes."""
    from vidrep.eval.report import comparison_rows

    header, rows = comparison_rows(results, paths)
    sink.add(
        "pictures/paper_table",
        table_image(
            header,
            rows,
            "evaluations in the paper's row order, beside the paper's "
            "VOC2012 detection mAP (Wang & Gupta 2015, Table 1)",
        ),
        "paper table",
    )
    if len({tuple(r["data"]["classes"]) for r in results}) == 1:
        sink.add("pictures/per_class_ap", ap_bar_chart(results), "per-class AP of the compared evaluations")
