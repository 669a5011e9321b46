"""Results files and tables: results.json + results.md per evaluation, and the paper's table
gathered from several evaluations:

    python -m vidrep.eval.report outputs/eval/*/results.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# The paper's row order (Wang & Gupta 2015, Table 1); a result's `row` is one of these.
ROW_ORDER = (
    "scratch",
    "unsup + ft",
    "unsup + iterative ft",
    "unsup + ft, ensemble",
    "imagenet + ft",
    "unsup, no ft",
    "unsup, no ft, ensemble",
    "imagenet, no ft",
)


# The paper's VOC2012 detection mAP per row (method.md section 5; only 52.0 and 54.4 are confirmed
# from the abstract). Shown beside rows of the detection protocol only: the paper reports no VOC07
# classification figure (method.md section 5 lists later third-party ones).
PAPER_MAP = {
    "scratch": "44.0",
    "unsup + ft": "46.2 / 47.0 / 47.5 (1.5M / 5M / 8M)",
    "unsup + iterative ft": "48.0 (5M)",
    "unsup + ft, ensemble": "50.5 (2 nets) / 52.0 (3 nets)",
    "imagenet + ft": "50.1",
    "unsup, no ft": "26.1 (8M, pool5)",
    "unsup, no ft, ensemble": "28.2 (5M + 8M)",
    "imagenet, no ft": "40.4",
}


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def per_class_table(result: dict) -> str:
    """Rows: the evaluated layers (svm) or the one detection result; columns: mAP and every class."""
    classes = result["data"]["classes"]
    lines = ["| layer | mAP | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 2)]
    for layer, r in result["layers"].items():
        mark = " (best)" if layer == result.get("best_layer") and len(result["layers"]) > 1 else ""
        lines.append(f"| {layer}{mark} | {_fmt(r['map'])} | " + " | ".join(_fmt(a) for a in r["ap"]) + " |")
    return "\n".join(lines)


def default_row(protocol: str, finetune: str | None, checkpoints: Sequence[str], supervised: bool = False) -> str:
    """The paper's table row of a result. `supervised`: a network trained with ImageNet's labels that
    the spec does not name as `imagenet:` (a Caffe file with its fc8 classifier, as BVLC's CaffeNet)."""
    imagenet = supervised or any(c.startswith("imagenet:") for c in checkpoints)
    if checkpoints == ["random"]:
        return "scratch"
    if protocol == "svm" or finetune == "none":
        if imagenet:
            return "imagenet, no ft"
        return "unsup, no ft, ensemble" if len(checkpoints) > 1 else "unsup, no ft"
    if imagenet:
        return "imagenet + ft"
    if finetune == "iterative":
        return "unsup + iterative ft"
    return "unsup + ft, ensemble" if len(checkpoints) > 1 else "unsup + ft"


def retrieval_table(results: dict[str, dict], versus: dict[str, dict] | None = None) -> str:
    lines = [
        "| features | R@1 (%) | R@5 (%) | median rank | pairs | videos | candidates (mean) "
        "| vs init: wins / losses (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        v = (versus or {}).get(name)
        cmp = f"{v['wins']} / {v['losses']} ({v['p']:.2g})" if v else ""
        lines.append(
            f"| {name} | {100 * r['recall_at_1']:.1f} | {100 * r['recall_at_5']:.1f} | {r['median_rank']:g} | "
            f"{r['num_pairs']} | {r['num_videos']} | {r['num_candidates_mean']:.1f} | {cmp} |"
        )
    return "\n".join(lines)


def gathered_retrieval_table(results: Sequence[dict], paths: Sequence[Path]) -> str:
    """Several protocol=retrieval results, one row per evaluated feature (the gathered report)."""
    lines = [
        "| label | features | R@1 (%) | R@5 (%) | median rank | pairs | videos | corpus | results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result, path in zip(results, paths):
        for name, r in result["retrieval"].items():
            lines.append(
                f"| {result['label']} | {name} | {100 * r['recall_at_1']:.1f} | {100 * r['recall_at_5']:.1f} | "
                f"{r['median_rank']:g} | {r['num_pairs']} | {r['num_videos']} | {result['data']['corpus']} | {path} |"
            )
    return "\n".join(lines)


def write_results(run_dir: Path, result: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    if "retrieval" in result:
        table = retrieval_table(result["retrieval"], result.get("vs_initialisation"))
    else:
        table = per_class_table(result)
    voc = {"name", "year"} & set(result.get("data", {}))  # retrieval's data is a corpus
    on = f" on {data_name(result)}" if voc else ""  # a synthetic set is never called VOC
    (run_dir / "results.md").write_text(f"# {result['row']}: {result['label']}{on}\n\n{table}\n")


@contextmanager
def wandb_eval_run(cfg, run_dir: Path, name: str) -> Iterator:
    """evaluate.py's W&B run (job type eval, the whole config), finished on exit; None when
    wandb.enabled=false. The mode is settled first, so it never prompts or waits offline."""
    if not cfg.wandb.enabled:
        yield None
        return
    import wandb
    from omegaconf import OmegaConf

    from vidrep.common.loggers import resolve_wandb_mode

    run = wandb.init(
        project=cfg.wandb.project,
        dir=str(run_dir),
        mode=resolve_wandb_mode(cfg.wandb.get("mode")),
        job_type="eval",
        name=name,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        yield run
    finally:
        run.finish()


def data_name(result: dict) -> str:
    """ "VOC2007", or what results.json names its data (a synthetic set is never called VOC)."""
    return result["data"].get("name") or f"VOC{result['data']['year']}"


def _paper_figure(result: dict) -> str:
    if result["data"].get("synthetic"):
        return "- (synthetic data)"
    return PAPER_MAP.get(result["row"], "-") if result["protocol"]["name"] == "detection" else "- (detection only)"


def comparison_rows(results: Sequence[dict], paths: Sequence[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of several evaluations in the paper's row order, with the paper's figure."""
    rows = []
    for r, p in zip(results, paths):
        order = ROW_ORDER.index(r["row"]) if r["row"] in ROW_ORDER else len(ROW_ORDER)
        data = f"{data_name(r)} {r['data']['test_split']}"
        rows.append(
            (
                order,
                [
                    r["row"],
                    r["label"],
                    r["protocol"]["name"],
                    data,
                    r.get("best_layer") or "",
                    _fmt(r["map"]),
                    _paper_figure(r),
                    str(p),
                ],
            )
        )
    rows.sort(key=lambda x: x[0])
    header = ["setting", "label", "protocol", "test data", "layer", "mAP", "paper (VOC2012 det.)", "results"]
    return header, [row for _, row in rows]


def gather(paths: Sequence[Path]) -> str:
    """The paper's table layout from several results.json files, the paper's figures beside them."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    retrieval = [(r, p) for r, p in zip(results, paths) if "retrieval" in r]
    voc = [(r, p) for r, p in zip(results, paths) if "retrieval" not in r]
    tables = []
    if voc:
        header, rows = comparison_rows([r for r, _ in voc], [p for _, p in voc])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        tables.append("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]))
    if retrieval:
        tables.append(gathered_retrieval_table([r for r, _ in retrieval], [p for _, p in retrieval]))
    return "\n\n".join(tables)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Gather evaluate.py results into the paper's table layout.")
    p.add_argument("results", nargs="+", type=Path, help="results.json files (e.g. outputs/eval/*/results.json)")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.results if not r.is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    table = gather(args.results)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
