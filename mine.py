"""Mine tracked patch pairs from videos: python mine.py videos=<folder or list> out=<corpus>.

The same as `python -m vidrep.mine` and the console script `vidrep-mine` (vidrep/mine.py)."""

from vidrep.mine import cli

if __name__ == "__main__":
    cli()
