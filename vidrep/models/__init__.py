from vidrep.models.caffenet import FEATURE_LAYERS, CaffeNet, TorchvisionAlexNet
from vidrep.models.embedding import EmbeddingNet
from vidrep.models.resnet import ResNet18Trunk
from vidrep.models.trunk import Trunk, build_trunk

__all__ = ["FEATURE_LAYERS", "CaffeNet", "TorchvisionAlexNet", "EmbeddingNet", "ResNet18Trunk", "Trunk", "build_trunk"]
