"""Evaluate checkpoints on PASCAL VOC: python evaluate.py ckpt=<last.ckpt> voc.root=<VOCdevkit> [protocol=...],
or by retrieval on held-out videos: python evaluate.py protocol=retrieval ckpt=<last.ckpt> retrieval.corpus=<corpus>."""

import hydra
from omegaconf import DictConfig

from vidrep.eval.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
