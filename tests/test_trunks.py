"""The trunk interface (vidrep/models/trunk.py): what each trunk declares is what it computes, and a
second family (model=resnet18) goes through training, checkpoints, evaluate.py's rebuild and every
protocol's feature path by config alone. Copy these tests for a new trunk (docs/extending.md)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY

from vidrep.models import CaffeNet, ResNet18Trunk, TorchvisionAlexNet, build_trunk
from vidrep.models.resnet import IMAGENET_MEAN, IMAGENET_STD, WeightsFileError
from vidrep.models.trunk import Trunk

# Each family at the input its fixed pooling kernels are stated for.
NATIVE = {CaffeNet: 227, TorchvisionAlexNet: 227, ResNet18Trunk: 224}


def _trunk(cls, size, seed=0) -> Trunk:
    torch.manual_seed(seed)
    return cls(input_size=size, fc6_dim=64, fc7_dim=32).eval()


@pytest.mark.parametrize("cls", [CaffeNet, TorchvisionAlexNet, ResNet18Trunk])
def test_declared_layers_and_dims_are_what_the_trunk_computes(cls):
    trunk = _trunk(cls, NATIVE[cls])
    with torch.no_grad():
        feats = trunk.forward_features(torch.randn(2, 3, trunk.input_size, trunk.input_size), trunk.feature_layers)
    assert list(feats) == list(trunk.feature_layers)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == trunk.feature_shapes()
    out = trunk(torch.zeros(2, 3, trunk.input_size, trunk.input_size))
    assert feats[trunk.feature_layers[-1]].shape == (2, trunk.out_dim) == out.shape
    assert all(feats[name].dim() == 4 for name in (*trunk.benchmark_layers, *trunk.fixed_pooling, trunk.region_layer))
    assert feats[trunk.pooled_layer].dim() == 2 and len(trunk.pixel_mean) == 3
    # the Goyal-style kernels give ~9K values per layer at the trunk's own input size (torchvision's
    # AlexNet has other channel counts: it keeps CaffeNet's kernels by layer name, as it always did)
    from vidrep.eval.features import fixed_pool

    dims = {name: fixed_pool(feats[name], *k).shape[1] for name, k in trunk.fixed_pooling.items()}
    assert set(dims) == set(trunk.benchmark_layers)
    assert cls is TorchvisionAlexNet or all(8192 <= d <= 9600 for d in dims.values()), dims
    # RoI-pooled region cells, finished by the trunk, are as wide as the warp path's pooled layer
    # (CaffeNet: 256 x 6 x 6)
    channels = trunk.feature_shapes()[trunk.region_layer][0]
    cells = trunk.pool_regions(torch.zeros(3, channels, trunk.region_cells, trunk.region_cells))
    assert cells.shape == (3, feats[trunk.pooled_layer].shape[1])
    # the declared stride of the region layer is its map's scale: size / stride cells, less at most 2 at the borders
    side = trunk.feature_shapes(448, [trunk.region_layer])[trunk.region_layer][-1]
    assert 0 <= 448 / trunk.region_stride - side <= 2
    # the body is everything but the head, and the head exists
    head = set(trunk.state_dict()) - set(trunk.body_state())
    assert head == {f"{p}{s}" for p in trunk.head_prefixes for s in ("weight", "bias")}


@pytest.mark.parametrize("cls", [CaffeNet, ResNet18Trunk])
def test_a_trunk_is_rebuilt_from_its_recorded_config(cls):
    trunk = _trunk(cls, 99, seed=1)
    config = trunk.config()
    assert config["_target_"] == f"{cls.__module__}.{cls.__name__}" and config["input_size"] == 99
    assert json.loads(json.dumps(config)) == config  # plain values: weights_only loading, YAML
    again = build_trunk(config)
    again.load_state_dict(trunk.state_dict())
    x = torch.randn(2, 3, 99, 99)
    torch.testing.assert_close(again.eval()(x), trunk(x))
    with pytest.raises(ValueError, match="not a vidrep.models.Trunk subclass"):
        build_trunk({"_target_": "os.system", "command": "true"})


@pytest.mark.parametrize("cls", [CaffeNet, TorchvisionAlexNet])
def test_final_relu_false_keeps_fc7_signed_with_the_same_parameters(cls):
    """model.net.trunk.final_relu=false: fc7 without its ReLU (negative values, no unit zero on every
    patch), the same state dict keys and weights as the released layout, recorded for the rebuild."""
    torch.manual_seed(0)  # experiment=cpu's init: with the released biases of 1, fc7 is ~1 everywhere
    with_relu = cls(input_size=99, fc6_dim=64, fc7_dim=32, init="kaiming", bias_one=False).eval()
    without = build_trunk(with_relu.config() | {"final_relu": False}).eval()
    assert list(without.state_dict()) == list(with_relu.state_dict())
    without.load_state_dict(with_relu.state_dict())
    x = torch.randn(8, 3, 99, 99) * 60
    with torch.no_grad():
        raw, released = without(x), with_relu(x)
        fc6 = without.forward_features(x, ["fc6"])["fc6"]
    assert (raw < 0).any() and (raw != 0).any(dim=0).all()
    torch.testing.assert_close(released, torch.relu(raw))
    torch.testing.assert_close(raw, without.fc7(fc6))
    assert without.config()["final_relu"] is False and build_trunk(without.config()).final_relu is False
    import hydra

    cfg = _compose(["data=demo", "model.net.trunk.final_relu=false"])
    assert hydra.utils.instantiate(cfg.model.net.trunk).final_relu is False


def test_resnet18_reads_torchvision_weights_from_a_local_file_only(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    reference = resnet18(weights=None).eval()
    for m in reference.modules():  # non-trivial running statistics, so that eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    ours = ResNet18Trunk(input_size=64, fc6_dim=16, fc7_dim=8, weights=str(tmp_path / "resnet18.pth")).eval()
    assert ours.config()["weights"] is None  # a rebuild from a checkpoint never needs the file
    x = torch.randint(0, 256, (2, 3, 64, 64)).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    body = torch.nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        theirs = body((x / 255 - mean) / std)  # torchvision's preprocessing
        mine = ours.forward_features(x - torch.tensor(ours.pixel_mean).view(1, 3, 1, 1), ["layer4"])["layer4"]  # ours
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsFileError, match="missing.pth not found; vidrep never downloads"):
        ResNet18Trunk(weights=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "alexnet.pth")
    with pytest.raises(WeightsFileError, match="alexnet.pth is not a torchvision ResNet-18 state_dict"):
        ResNet18Trunk(weights=str(tmp_path / "alexnet.pth"))


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_resnet18_by_config_through_checkpoint_rebuild_and_every_feature_path(tmp_path):
    """model=resnet18: the module's checkpoint (as Lightning writes it) is rebuilt by evaluate.py's
    loader alone, and the svm, retrieval and detection paths give features of the declared widths."""
    import hydra

    from vidrep.eval.features import extract_features, load_network
    from vidrep.eval.frozen import benchmark_layers
    from vidrep.eval.regions import DetectionNet
    from vidrep.eval.retrieval import network_featurizer

    cfg = _compose(
        ["model=resnet18", "model.input_size=67", "model.net.trunk.fc6_dim=64", "model.net.trunk.fc7_dim=32"]
    )
    assert cfg.model.pixel_mean == [255.0 * m for m in IMAGENET_MEAN]
    module = hydra.utils.instantiate(cfg.model)
    assert type(module.net.trunk) is ResNet18Trunk
    with torch.no_grad():  # a training step's worth of change, so that the rebuild cannot pass on the init alone
        for p in module.net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "r.ckpt")

    net = load_network(str(tmp_path / "r.ckpt"))  # what evaluate.py does with ckpt=<file>
    assert type(net.trunk) is ResNet18Trunk and net.input_size == 67
    patches = torch.randint(0, 256, (3, 3, 67, 67), dtype=torch.uint8)
    with torch.no_grad():
        expected = module.net.trunk.eval()(module.preprocess(patches))
        torch.testing.assert_close(net.trunk(net.preprocess(patches)), expected)

    images = []
    for i in range(2):
        images.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(images[-1]), np.random.default_rng(i).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    layers = benchmark_layers([net])
    assert layers == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    shapes = net.trunk.feature_shapes()
    for pooling in ("goyal", "adaptive"):
        feats = extract_features(net, images, [*layers, "avgpool", "fc7"], pooling=pooling)
        assert feats["fc7"].shape == (2, 32) and feats["avgpool"].shape == (2, 512)
        for name in layers:
            c, h, _ = shapes[name]
            assert feats[name].shape[0] == 2 and feats[name].shape[1] % c == 0 and feats[name].shape[1] <= c * h * h
            np.testing.assert_allclose(np.linalg.norm(feats[name], axis=1), 1.0, rtol=1e-5)
    retrieval = network_featurizer([net], ["layer4", "fc7"])(patches.permute(0, 2, 3, 1).numpy())
    assert retrieval["fc7"].shape == (3, 32) and retrieval["layer4"].shape == (3, 512 * 3 * 3)

    for regions in ("warp", "roi_pool"):
        det = DetectionNet(net.trunk, num_classes=4, regions=regions, input_size=67, fc6_dim=16, fc7_dim=16).eval()
        assert det.fc6.in_features == 512
        with torch.no_grad():
            if regions == "warp":
                out = det.warped(net.preprocess(patches))
            else:
                image = net.preprocess(torch.randint(0, 256, (1, 3, 120, 160), dtype=torch.uint8))
                rois = torch.tensor([[0.0, 0.0, 60.0, 60.0], [40.0, 20.0, 159.0, 119.0], [5.0, 5.0, 20.0, 30.0]])
                out = det.pooled(image, rois)
        assert out["pool5"].shape == (3, 512) and out["fc7"].shape == (3, 16) and out["logits"].shape == (3, 5)
    # iterative fine-tuning copies the body (batch norm statistics included), never the head
    assert not any(k.startswith(("fc6.", "fc7.")) for k in net.trunk.body_state())
    assert "layer4.1.bn2.running_var" in net.trunk.body_state()


def test_random_builds_the_configured_trunk():
    from vidrep.eval.features import load_network

    trunk = _compose(["model=resnet18"]).model.net.trunk
    from omegaconf import OmegaConf

    net = load_network("random", input_size=67, trunk_config=OmegaConf.to_container(trunk, resolve=True))
    assert type(net.trunk) is ResNet18Trunk and net.trunk.input_size == 67 and net.key.startswith("random-")
    legacy = load_network("random", input_size=67)  # no config: CaffeNet, as before
    assert type(legacy.trunk) is CaffeNet and legacy.key == "random-67-4096-1024-0"


@pytest.mark.slow
def test_train_then_evaluate_resnet18_by_config_alone(tmp_path, tiny_corpus):
    """train.py model=resnet18 writes a checkpoint that evaluate.py runs with no trunk option."""
    from vidrep.data.synthetic import SHAPES
    from vidrep.data.synthetic_voc import write_synthetic_voc

    run = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "model=resnet18",
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer.max_steps=2",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["net"]["trunk"]["_target_"] == "vidrep.models.resnet.ResNet18Trunk"
    voc = write_synthetic_voc(tmp_path / "voc", num_trainval=12, num_test=12, height=96, width=128)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            f"ckpt={ckpt}",
            f"voc.root={voc}",
            f"voc.classes=[{','.join(SHAPES)}]",
            "protocol=svm_cpu",
            "protocol.layers=[layer4,fc7]",
            "protocol.costs=[0.1,10]",
            "protocol.folds=2",
            f"cache_dir={tmp_path / 'cache'}",
            "wandb.enabled=false",
            "pictures=false",
            f"hydra.run.dir={tmp_path}/eval",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(result["layers"]) == {"layer4", "fc7"} and result["checkpoints"] == [str(ckpt)]
