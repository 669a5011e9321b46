"""Evaluate checkpoints on PASCAL VOC: python evaluate.py ckpt=<last.ckpt> voc.root=<VOCdevkit> [protocol=...],
or by retrieval on held-out videos: python evaluate.py protocol=retrieval ckpt=<last.ckpt> retrieval.corpus=<corpus>."""

import hydra
from omegaconf import DictConfig

from vidrep.common.preflight import one_line_errors, preflight
from vidrep.common.workarounds import quiet_lightning
from vidrep.eval.checks import check_evaluate
from vidrep.eval.run import evaluate
from vidrep.viz.evaluation import draw_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    with one_line_errors():
        evaluate(cfg, draw=draw_evaluation)


def cli() -> None:
    """The console script `vidrep-evaluate` and `python -m vidrep.evaluate`."""
    preflight("evaluate", check_evaluate)
    main()


if __name__ == "__main__":
    cli()
