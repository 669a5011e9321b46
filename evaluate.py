"""Evaluate checkpoints on PASCAL VOC: python evaluate.py ckpt=<last.ckpt> voc.root=<VOCdevkit> [protocol=...],
or by retrieval on held-out videos: python evaluate.py protocol=retrieval ckpt=<last.ckpt> retrieval.corpus=<corpus>."""

import hydra
from omegaconf import DictConfig

from vidrep.common.preflight import preflight
from vidrep.eval.checks import check_evaluate
from vidrep.eval.run import evaluate
from vidrep.viz.evaluation import draw_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, draw=draw_evaluation)


if __name__ == "__main__":
    preflight("evaluate", check_evaluate)
    main()
