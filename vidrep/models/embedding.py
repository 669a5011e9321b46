"""The siamese-triplet embedding: a trunk's fc7 followed by L2 normalisation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class EmbeddingNet(nn.Module):
    """Wraps a trunk (a `vidrep.models.Trunk`: CaffeNet by default) so that one module is shared by
    training, fine-tuning and feature extraction: `trunk.*` keys are the same in every checkpoint."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    @property
    def input_size(self) -> int:
        return self.trunk.input_size

    @property
    def out_dim(self) -> int:
        return self.trunk.out_dim

    def config(self) -> dict:
        """The `model.net` node that rebuilds this network (checkpoints store it)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", "trunk": self.trunk.config()}

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.trunk(x), dim=1)
