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
        "conv1": (2, 96, 55, 55),
        "conv2": (2, 256, 27, 27),
        "conv3": (2, 384, 13, 13),
        "conv4": (2, 384, 13, 13),
        "conv5": (2, 256, 13, 13),
        "pool5": (2, 9216),
        "fc6": (2, 4096),
        "fc7": (2, 1024),
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
    fan_in = {
        "conv1": 3 * 121,
        "conv2": 48 * 25,
        "conv3": 256 * 9,
        "conv4": 192 * 9,
        "conv5": 192 * 9,
        "fc6": 9216,
        "fc7": 4096,
    }
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


# ---------------------------------------------------------------- equal-output implementations


@pytest.mark.parametrize("size", [5, 4, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_slices_equals_torch_local_response_norm(size, channels_last):
    from vidrep.models.ops import lrn_slices

    torch.manual_seed(0)
    # post-ReLU, post-pool activations of the scale CaffeNet's first layers produce
    x = (torch.randn(3, 16, 9, 11) * 40).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref = torch.nn.LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=1.0)(x)
    out = lrn_slices(x, size, 1e-4, 0.75, 1.0)
    assert (out - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    (g_out,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["split", "dense"])
def test_grouped_convolution_implementations_agree(impl):
    from vidrep.models.ops import GroupedConv2d

    torch.manual_seed(0)
    ref = GroupedConv2d(8, 12, 3, padding=1, groups=2)
    alt = GroupedConv2d(8, 12, 3, padding=1, groups=2, impl=impl)
    alt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    y_ref, y_alt = ref(x), alt(x)
    torch.testing.assert_close(y_alt, y_ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, ref.weight, ref.bias])
    g_alt = torch.autograd.grad(y_alt.square().sum(), [x, alt.weight, alt.bias])
    for a, b in zip(g_alt, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # the block-diagonal weight is exactly the groups' weights on the diagonal
    dense = alt.block_diagonal_weight()
    assert torch.equal(dense[:6, :4], ref.weight[:6]) and torch.equal(dense[6:, 4:], ref.weight[6:])
    assert not dense[:6, 4:].any() and not dense[6:, :4].any()


def test_caffenet_implementations_give_equal_outputs_and_share_state_dicts():
    torch.manual_seed(0)
    kw = dict(input_size=67, fc6_dim=32, fc7_dim=16)
    ref = CaffeNet(**kw).eval()
    alt = CaffeNet(**kw, lrn="slices", conv1_in_channels=4, grouped_conv="dense").eval()
    state = ref.state_dict()
    assert {k: v.shape for k, v in alt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    alt.load_state_dict(state)
    ref.load_state_dict(alt.state_dict())  # and back
    x = torch.randn(2, 3, 67, 67) * 50
    with torch.no_grad():
        want = ref.forward_features(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = alt.to(memory_format=fmt).forward_features(x.contiguous(memory_format=fmt))
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="LRN"):
        CaffeNet(**kw, lrn="pool")
    with pytest.raises(ValueError, match="grouped"):
        CaffeNet(**kw, grouped_conv="fast")


def test_conv1_padded_to_four_channels_gives_equal_outputs_and_grads():
    from vidrep.models.ops import PaddedInputConv2d

    torch.manual_seed(0)
    ref = PaddedInputConv2d(3, 8, 11, stride=4)
    alt = PaddedInputConv2d(3, 8, 11, stride=4, pad_to=4)
    alt.load_state_dict(ref.state_dict())
    assert alt.weight.shape == (8, 3, 11, 11)
    x = torch.randn(2, 3, 31, 31, requires_grad=True)
    y_ref, y_alt = ref(x), alt(x)
    torch.testing.assert_close(y_alt, y_ref)
    g_ref = torch.autograd.grad(y_ref.sum(), [x, ref.weight])
    g_alt = torch.autograd.grad(y_alt.sum(), [x, alt.weight])
    for a, b in zip(g_alt, g_ref):
        torch.testing.assert_close(a, b)


def test_fused_sgd_takes_the_released_solvers_steps():
    """model.optimizer.fused=true: the same updates of both parameter groups (weights with decay,
    biases at 2x lr without) as torch's default SGD kernels."""
    from functools import partial

    from vidrep.models.embedding import EmbeddingNet
    from vidrep.training.module import TripletModule

    x = torch.randint(0, 255, (4, 3, 67, 67), dtype=torch.uint8)
    params = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = TripletModule(
            EmbeddingNet(CaffeNet(67, 32, 16)),
            {},
            partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=0.0005, fused=fused),
            scheduler=None,
            input_size=67,
        )
        optimizer = module.configure_optimizers()
        for _ in range(3):
            optimizer.zero_grad()
            module(x).square().sum().backward()
            optimizer.step()
        params.append([p.detach().clone() for p in module.net.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
