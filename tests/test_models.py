import pytest
import torch

from vidrep.models import FEATURE_LAYERS, CaffeNet, EmbeddingNet, TorchvisionAlexNet
from vidrep.models.caffenet import pool5_size


def test_caffenet_parameter_count_and_layers():
    net = CaffeNet()
    expected = {
        "conv1": 96 * 3 * 11 * 11 + 96,
        "conv2": 256 * 48 * 5 * 5 + 256,
        "conv3": 384 * 256 * 3 * 3 + 384,
        "conv4": 384 * 192 * 3 * 3 + 384,
        "conv5": 256 * 192 * 3 * 3 + 256,
        "fc6": 9216 * 4096 + 4096,
        "fc7": 4096 * 1024 + 1024,
    }
    for name, count in expected.items():
        assert sum(p.numel() for p in getattr(net, name).parameters()) == count, name
    assert sum(p.numel() for p in net.parameters()) == 44_282_240
    assert net.conv2.groups == net.conv4.groups == net.conv5.groups == 2


def test_named_feature_shapes_at_227():
    net = CaffeNet().eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(2, 3, 227, 227))
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {
        "conv1": (2, 96, 55, 55), "conv2": (2, 256, 27, 27), "conv3": (2, 384, 13, 13),
        "conv4": (2, 384, 13, 13), "conv5": (2, 256, 13, 13), "pool5": (2, 9216),
        "fc6": (2, 4096), "fc7": (2, 1024),
    }
    assert all((v >= 0).all() for k, v in feats.items() if k != "pool5")


def test_partial_features_stop_early():
    net = CaffeNet(input_size=99, fc6_dim=64, fc7_dim=32)
    out = net.forward_features(torch.randn(1, 3, 99, 99), ["conv3"])
    assert list(out) == ["conv3"]
    with pytest.raises(ValueError, match="unknown feature layers"):
        net.forward_features(torch.randn(1, 3, 99, 99), ["conv9"])


def test_released_initialisation():
    torch.manual_seed(0)
    net = CaffeNet()
    assert net.conv3.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert net.fc6.weight.std().item() == pytest.approx(0.005, rel=0.02)
    for name, bias in [("conv1", 0), ("conv2", 1), ("conv3", 0), ("conv4", 1), ("conv5", 1), ("fc6", 1), ("fc7", 1)]:
        assert torch.all(getattr(net, name).bias == bias), name


def test_kaiming_initialisation_scales_each_layer_by_its_fan_in():
    torch.manual_seed(0)
    net = CaffeNet(init="kaiming", bias_one=False)
    # fan_in of a grouped convolution counts only its group's input channels.
    fan_in = {"conv1": 3 * 121, "conv2": 48 * 25, "conv3": 256 * 9, "conv4": 192 * 9, "conv5": 192 * 9, "fc6": 9216, "fc7": 4096}
    for name, n in fan_in.items():
        layer = getattr(net, name)
        assert layer.weight.std().item() == pytest.approx((2 / n) ** 0.5, rel=0.03), name
        assert torch.all(layer.bias == 0), name
    assert torch.all(CaffeNet(input_size=99, fc6_dim=8, fc7_dim=8, init="kaiming").conv2.bias == 1)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        CaffeNet(input_size=99, fc6_dim=8, fc7_dim=8, init="xavier")


def test_embedding_is_unit_norm_and_small_inputs():
    assert pool5_size(227) == 6 and pool5_size(99) == 2
    net = EmbeddingNet(CaffeNet(input_size=99, fc6_dim=64, fc7_dim=32, bias_one=False))
    z = net(torch.randn(3, 3, 99, 99) * 50)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="too small"):
        CaffeNet(input_size=40)


def test_torchvision_variant_same_interface():
    net = TorchvisionAlexNet(input_size=227, fc6_dim=64, fc7_dim=32)
    feats = net.forward_features(torch.randn(1, 3, 227, 227))
    assert list(feats) == list(FEATURE_LAYERS)
    assert feats["conv1"].shape[1] == 64 and feats["pool5"].shape == (1, 9216) and feats["fc7"].shape == (1, 32)


def test_channels_last_and_compile_keep_outputs_and_checkpoint_keys():
    from functools import partial

    from vidrep.models.caffenet import CaffeNet
    from vidrep.models.embedding import EmbeddingNet
    from vidrep.training.module import TripletModule

    def module(**kw):
        torch.manual_seed(0)
        net = EmbeddingNet(CaffeNet(67, 32, 16))
        return TripletModule(net, {}, partial(torch.optim.SGD, lr=0.1), input_size=67, **kw)

    x = torch.randint(0, 255, (4, 3, 67, 67), dtype=torch.uint8)
    plain, fast = module(), module(channels_last=True, compile=True)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    assert fast.state_dict().keys() == plain.state_dict().keys()
