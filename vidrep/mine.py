"""Mine tracked patch pairs from videos: python mine.py videos=<folder or list> out=<corpus>."""

import os

# Before numpy/OpenCV load: their BLAS would otherwise spin extra threads in every mining process.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vidrep.common.preflight import one_line_errors, preflight  # noqa: E402
from vidrep.mining.checks import check_mine  # noqa: E402
from vidrep.mining.cli import mine  # noqa: E402
from vidrep.viz.mining import draw_run_pictures  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="mine")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        mine(cfg, draw=draw_run_pictures)


def cli() -> None:
    """The console script `vidrep-mine` and `python -m vidrep.mine`."""
    preflight("mine", check_mine)
    main()


if __name__ == "__main__":
    cli()
