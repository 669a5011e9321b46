"""Pretrained weights from local files only: vidrep never downloads, and a missing or foreign file
is an error that names it and says where to get it."""

from __future__ import annotations

from pathlib import Path

import torch


def read_weights_file(path: str | Path, what: str, get_it: str, error: type[Exception] = ValueError) -> dict:
    """The state_dict in the local file `path`; `what` names the weights, `get_it` says how to
    obtain the file, `error` is the exception class the caller's users expect."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{what} weights {path} not found; vidrep never downloads weights. {get_it}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not a state_dict
        raise error(f"{path} is not a torch state_dict ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise error(f"{path} holds a {type(state).__name__}, not a {what} state_dict")
    return state
