"""Train the siamese-triplet network: python train.py [data=8M data.root=...] [trainer.devices=4]."""

import sys

import hydra
from omegaconf import DictConfig

from vidrep.common.preflight import one_line_errors, preflight
from vidrep.common.workarounds import quiet_lightning
from vidrep.training.checks import check_train
from vidrep.training.resume import with_run_overrides
from vidrep.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    with one_line_errors():
        train(cfg)


def cli() -> None:
    """The console script `vidrep-train` and `python -m vidrep.train`."""
    sys.argv[1:] = with_run_overrides(sys.argv[1:])
    preflight("train", check_train)
    main()


if __name__ == "__main__":
    cli()
