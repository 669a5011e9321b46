"""Train the siamese-triplet network: python train.py [data=8M data.root=...] [trainer.devices=4].

The same as `python -m vidrep.train` and the console script `vidrep-train` (vidrep/train.py)."""

from vidrep.train import cli

if __name__ == "__main__":
    cli()
