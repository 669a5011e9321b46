"""The Hydra configs of mine.py, train.py and evaluate.py: a package, so that an installed wheel
carries them and Hydra finds them."""
