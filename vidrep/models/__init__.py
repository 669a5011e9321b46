from vidrep.models.caffenet import FEATURE_LAYERS, CaffeNet, TorchvisionAlexNet
from vidrep.models.embedding import EmbeddingNet

__all__ = ["FEATURE_LAYERS", "CaffeNet", "TorchvisionAlexNet", "EmbeddingNet"]
