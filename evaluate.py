"""Evaluate checkpoints on PASCAL VOC: python evaluate.py ckpt=<last.ckpt> voc.root=<VOCdevkit> [protocol=...],
or by retrieval on held-out videos: python evaluate.py protocol=retrieval ckpt=<last.ckpt> retrieval.corpus=<corpus>.

The same as `python -m vidrep.evaluate` and the console script `vidrep-evaluate` (vidrep/evaluate.py)."""

from vidrep.evaluate import cli

if __name__ == "__main__":
    cli()
