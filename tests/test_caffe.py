"""Caffe files in (vidrep/models/caffe.py): caffemodels written here with the `protobuf` library in
both layer formats from known tensors, converted, and the network's outputs checked against Caffe's
layer definitions written out below (grouped convolution, LRN across channels, ceil-mode max
pooling, channel-major flatten before fc6, BGR input minus the centre-cropped mean image), not
against vidrep's network code."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from vidrep.data.synthetic import SHAPES
from vidrep.data.synthetic_voc import write_synthetic_voc
from vidrep.eval.features import CheckpointError, load_network
from vidrep.models import caffe
from vidrep.models.caffe import CaffeFileError

FC6, FC7, FC8 = 24, 16, 10
# name: (weight shape, stride, pad, groups) as BVLC's CaffeNet and the released unsup_net_deploy.prototxt
CONVS = {
    "conv1": ((96, 3, 11, 11), 4, 0, 1),
    "conv2": ((256, 48, 5, 5), 1, 2, 2),
    "conv3": ((384, 256, 3, 3), 1, 1, 1),
    "conv4": ((384, 192, 3, 3), 1, 1, 2),
    "conv5": ((256, 192, 3, 3), 1, 1, 2),
}
FCS = {"fc6": (FC6, 256 * 6 * 6), "fc7": (FC7, FC6), "fc8": (FC8, FC7)}


def known_weights(seed=0, fc8=True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (weight, bias)} float32, each layer's weights of std sqrt(2 / fan_in) so activations keep their scale."""
    rng = np.random.default_rng(seed)
    shapes = {name: spec[0] for name, spec in CONVS.items()} | {n: s for n, s in FCS.items() if fc8 or n != "fc8"}
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32)
        out[name] = (w, rng.normal(0, 0.1, shape[0]).astype(np.float32))
    return out


def _blob(array: np.ndarray, v1: bool):
    blob = caffe.BlobProto()
    if v1:  # 2014-15 files: always 4-D num/channels/height/width (fc weights [1, 1, out, in], biases [1, 1, 1, out])
        blob.num, blob.channels, blob.height, blob.width = [1] * (4 - array.ndim) + list(array.shape)
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def write_caffemodel(path, weights, v1: bool, extra_layers=()) -> None:
    """A NetParameter as Caffe writes one: parameter-free layers in between, blobs on conv/fc layers."""
    net = caffe.NetParameter(name="CaffeNet")
    order = [("data", "Input" if not v1 else "DATA")]
    for name in weights:
        kind = ("Convolution", "CONVOLUTION") if name.startswith("conv") else ("InnerProduct", "INNER_PRODUCT")
        order.append((name, kind[v1]))
        order.append((f"relu{name[-1]}", "RELU" if v1 else "ReLU"))
        if name in ("conv1", "conv2"):
            order += [(f"pool{name[-1]}", "POOLING" if v1 else "Pooling"), (f"norm{name[-1]}", "LRN")]
    for name, kind in [*order, *extra_layers]:
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = name
        layer.type = caffe._V1_TYPES[kind] if v1 else kind
        if name in weights:
            layer.blobs.extend([_blob(a, v1) for a in weights[name]])
    path.write_bytes(net.SerializeToString())


def write_mean(path, mean: np.ndarray) -> None:
    blob = caffe.BlobProto()
    blob.num, blob.channels, blob.height, blob.width = 1, *mean.shape
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


# ---------------------------------------------------------------- Caffe's layers, written out


def ref_conv(x, w, b, stride, pad, groups):
    """Caffe's ConvolutionLayer: group g's outputs see only group g's input channels."""
    xs, ws, bs = x.chunk(groups, 1), w.chunk(groups, 0), b.chunk(groups)
    return torch.cat([F.conv2d(xi, wi, bi, stride=stride, padding=pad) for xi, wi, bi in zip(xs, ws, bs)], 1)


def ref_lrn(x, n=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe's LRNLayer ACROSS_CHANNELS: x_c * (k + alpha / n * sum_{c' in [c-2, c+2]} x_c'^2)^-beta."""
    scale = torch.full_like(x, k)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels, c + n // 2 + 1)
        scale[:, c] += alpha / n * (x[:, lo:hi] ** 2).sum(1)
    return x * scale**-beta


def ref_pool(x, kernel=3, stride=2):
    """Caffe's PoolingLayer MAX: ceil((size - kernel) / stride) + 1 outputs, windows clipped at the border."""
    h, w = x.shape[-2:]
    oh, ow = (math.ceil((s - kernel) / stride) + 1 for s in (h, w))
    x = F.pad(x, (0, (ow - 1) * stride + kernel - w, 0, (oh - 1) * stride + kernel - h), value=-math.inf)
    return x.unfold(2, kernel, stride).unfold(3, kernel, stride).amax(dim=(-1, -2))


def ref_forward(weights, rgb: np.ndarray, mean_bgr: np.ndarray, gray=False) -> dict[str, torch.Tensor]:
    """The Caffe network on an HWC uint8 RGB image: BGR (or grey x 3), minus the mean image's centre crop."""
    size = rgb.shape[0]
    img = rgb.astype(np.float64)
    if gray:
        img = np.repeat((img @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
    bgr = img[:, :, ::-1].transpose(2, 0, 1)
    off = (mean_bgr.shape[1] - size) // 2  # rcnn_create_model.m: floor((256 - 227) / 2) + 1, 1-based
    x = torch.from_numpy(bgr - mean_bgr[:, off : off + size, off : off + size])[None]
    t = {name: (torch.from_numpy(w).double(), torch.from_numpy(b).double()) for name, (w, b) in weights.items()}
    out = {}
    x = torch.relu(ref_conv(x, *t["conv1"], 4, 0, 1))
    x = torch.relu(ref_conv(ref_lrn(ref_pool(x)), *t["conv2"], 1, 2, 2))
    x = torch.relu(ref_conv(ref_lrn(ref_pool(x)), *t["conv3"], 1, 1, 1))
    x = torch.relu(ref_conv(x, *t["conv4"], 1, 1, 2))
    out["conv5"] = x = torch.relu(ref_conv(x, *t["conv5"], 1, 1, 2))
    x = ref_pool(x)
    if x.shape[-1] != 6:
        return out
    x = x.reshape(1, -1)  # Caffe's InnerProduct reads the blob in memory order: channel, row, column
    out["fc6"] = x = torch.relu(x @ t["fc6"][0].T + t["fc6"][1])
    out["fc7"] = x = torch.relu(x @ t["fc7"][0].T + t["fc7"][1])
    if "fc8" in t:
        out["fc8"] = x @ t["fc8"][0].T + t["fc8"][1]
    return out


def _image(size, seed=1) -> np.ndarray:
    """A fixed RGB image: smooth colour gradients plus noise, so that channel order and position matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([200 * xx, 180 * yy, 120 * (1 - xx * yy)], axis=2) + rng.normal(0, 25, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    weights = known_weights()
    write_caffemodel(folder / "layer.caffemodel", weights, v1=False)
    write_caffemodel(folder / "v1.caffemodel", weights, v1=True)
    mean = np.random.default_rng(2).uniform(60, 160, (3, 256, 256)).astype(np.float32)  # BGR, as Caffe's
    write_mean(folder / "mean.binaryproto", mean)
    return folder, weights, mean


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.float()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["layer", "v1"])
def test_a_converted_caffemodel_holds_the_files_tensors_and_computes_caffes_fc7(files, fmt, tmp_path):
    folder, weights, mean = files
    model = folder / f"{fmt}.caffemodel"
    out = tmp_path / "net.ckpt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidrep.models.caffe",
            "convert",
            str(model),
            str(out),
            "--mean",
            str(folder / "mean.binaryproto"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(out, weights_only=True)
    state = ckpt["state_dict"]
    for name, (w, b) in weights.items():
        assert torch.equal(state[f"net.trunk.{name}.weight"], torch.from_numpy(w)), name
        assert torch.equal(state[f"net.trunk.{name}.bias"], torch.from_numpy(b)), name
    assert torch.equal(state["net.trunk.mean_image"], torch.from_numpy(mean))
    assert ckpt["hyper_parameters"]["pixel_mean"] == pytest.approx(mean.mean(axis=(1, 2))[::-1].tolist(), rel=1e-6)

    image = _image(227)
    ref = ref_forward(weights, image, mean)
    for spec in (str(out), f"caffe:{model}+mean:{folder / 'mean.binaryproto'}"):
        net = load_network(spec)  # the checkpoint, rebuilt from its stored config, and the files directly
        assert net.input_size == 227
        x = net.preprocess(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
        with torch.no_grad():
            ours = net.trunk.forward_features(x, ["conv5", "fc6", "fc7", "fc8"])
        for name in ("conv5", "fc6", "fc7", "fc8"):
            _close(ours[name], ref[name])
        assert ours["fc7"].abs().sum() > 0 and (ours["fc8"] < 0).any()  # live units; fc8 has no ReLU


def test_caffes_ceil_mode_pooling_where_it_differs_from_floor(files):
    """At 235 px pool2 gives 14 (Caffe's ceil) where floor gives 13: conv5 as Caffe computes it."""
    folder, weights, mean = files
    trunk = caffe.caffe_trunk(folder / "layer.caffemodel", folder / "mean.binaryproto")
    image = _image(235, seed=3)
    ref = ref_forward(weights, image, mean)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float() - torch.tensor(trunk.pixel_mean).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ours = trunk.forward_features(x, ["conv5"])["conv5"]
    assert ours.shape[-1] == 14
    _close(ours, ref["conv5"])


def test_gray_feeds_the_grey_image_as_three_channels(files):
    folder, weights, mean = files
    grey_mean = np.repeat(mean.mean(axis=0, keepdims=True), 3, axis=0)
    write_mean(folder / "grey_mean.binaryproto", grey_mean)
    net = load_network(f"caffe:{folder / 'v1.caffemodel'}+mean:{folder / 'grey_mean.binaryproto'}+gray")
    image = _image(227, seed=4)
    with torch.no_grad():
        ours = net.trunk(net.preprocess(torch.from_numpy(image.transpose(2, 0, 1).copy())[None]))
    _close(ours, ref_forward(weights, image, grey_mean, gray=True)["fc7"])
    colour = load_network(f"caffe:{folder / 'v1.caffemodel'}+mean:{folder / 'grey_mean.binaryproto'}")
    assert colour.key != net.key  # a cache never mixes the two


def test_without_a_mean_file_channel_means_are_subtracted_in_bgr(files, tmp_path):
    folder, weights, _ = files
    trunk = caffe.caffe_trunk(folder / "layer.caffemodel")
    assert trunk.mean_image is None and trunk.bgr
    flat_bgr = np.broadcast_to(np.array(trunk.pixel_mean[::-1], dtype=np.float32)[:, None, None], (3, 256, 256))
    image = _image(227, seed=5)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float() - torch.tensor(trunk.pixel_mean).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        _close(trunk(x), ref_forward(known_weights(fc8=True), image, np.ascontiguousarray(flat_bgr))["fc7"])


def test_bad_files_and_layers_are_errors_that_name_them(files, tmp_path):
    folder, weights, _ = files
    cases = {
        "missing": ({k: v for k, v in weights.items() if k != "conv3"}, (), r"no weights for layer\(s\) \['conv3'\]"),
        "unknown": (weights, [("fc9", "InnerProduct")], r"\['fc9'\] hold weights"),
        "dense": (weights | {"conv2": (np.zeros((256, 96, 5, 5), np.float32), weights["conv2"][1])}, (), "conv2"),
        "fc6": (weights | {"fc6": (np.zeros((FC6, 100), np.float32), weights["fc6"][1])}, (), "layer 'fc6'"),
    }
    for name, (w, extra, message) in cases.items():
        path = tmp_path / f"{name}.caffemodel"
        write_caffemodel(path, w, v1=name == "dense", extra_layers=extra)
        if name == "unknown":  # give the extra layer weights
            net = caffe.NetParameter.FromString(path.read_bytes())
            net.layer[-1].blobs.extend(
                [_blob(np.zeros((3, FC8), np.float32), False), _blob(np.zeros(3, np.float32), False)]
            )
            path.write_bytes(net.SerializeToString())
        with pytest.raises(CaffeFileError, match=message) as caught:
            caffe.caffe_trunk(path)
        assert str(path) in str(caught.value)
    (tmp_path / "text.caffemodel").write_text("name: 'CaffeNet'\nlayer { name: 'conv1' }\n")  # a prototxt
    (tmp_path / "noise.caffemodel").write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in ("text", "noise"):
        with pytest.raises(CaffeFileError, match="is not a caffemodel") as caught:
            caffe.read_caffemodel(tmp_path / f"{bad}.caffemodel")
        assert f"{bad}.caffemodel" in str(caught.value)
    with pytest.raises(CaffeFileError, match="not a 3-channel mean image"):
        caffe.read_mean(folder / "layer.caffemodel")
    with pytest.raises(CheckpointError, match="never downloads"):  # evaluate.py's error type
        load_network(f"caffe:{tmp_path / 'absent.caffemodel'}")
    with pytest.raises(ValueError, match="unknown option"):
        caffe.parse_spec(f"caffe:{folder / 'layer.caffemodel'}+grey")
    from vidrep.eval.checks import checkpoint_files  # evaluate.py checks the files before it starts

    assert checkpoint_files(["random", "caffe:/m/a.caffemodel+mean:/m/b.binaryproto+gray"]) == [
        "/m/a.caffemodel",
        "/m/b.binaryproto",
    ]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidrep.models.caffe",
            "convert",
            str(tmp_path / "noise.caffemodel"),
            str(tmp_path / "o.ckpt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert not (tmp_path / "o.ckpt").exists()


def test_init_from_starts_training_from_the_caffe_network(files):
    from hydra import compose, initialize_config_module
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    import vidrep  # noqa: F401 - registers the config resolvers

    folder, weights, mean = files
    spec = f"caffe:{folder / 'layer.caffemodel'}+mean:{folder / 'mean.binaryproto'}"
    with initialize_config_module("vidrep.conf", version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"model.init_from='{spec}'", "model.input_size=227", "model.net.trunk.lrn=slices"]
        )
    module = instantiate(cfg.model)
    trunk = module.net.trunk
    assert torch.equal(trunk.conv2.weight.detach(), torch.from_numpy(weights["conv2"][0]))
    assert trunk.norm.impl == "slices"  # the configured implementation is kept
    assert module.hparams["pixel_mean"] == pytest.approx(mean.mean(axis=(1, 2))[::-1].tolist(), rel=1e-6)
    assert module.hparams["net"]["trunk"]["mean_image_size"] == [256, 256] and trunk.training
    image = _image(227, seed=6)
    with torch.no_grad():
        embedding = module.eval()(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
    fc7 = ref_forward(weights, image, mean)["fc7"]
    _close(embedding, F.normalize(fc7, dim=1))  # the module's own preprocessing gives Caffe's input
    with initialize_config_module("vidrep.conf", version_base="1.3"):
        small = compose("train", overrides=[f"model.init_from='{spec}'", "model.input_size=67"])
    with pytest.raises(InstantiationException, match="model.input_size=227"):
        instantiate(small.model)


@pytest.mark.slow
def test_evaluate_reads_caffe_files_in_the_svm_and_retrieval_protocols(files, tmp_path, tiny_corpus):
    from vidrep.data.corpus import read_manifest

    folder, _, _ = files
    spec = f"caffe:{folder / 'v1.caffemodel'}+mean:{folder / 'mean.binaryproto'}"
    voc = write_synthetic_voc(tmp_path / "voc", num_trainval=16, num_test=16, height=120, width=160)
    videos = sorted(set(read_manifest(tiny_corpus).column("video").to_pylist()))[:3]
    (tmp_path / "videos.txt").write_text("\n".join(videos) + "\n")
    common = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt={spec}", "wandb.enabled=false", "pictures=false"]
    runs = {
        "svm": [
            "protocol=svm_cpu",
            f"voc.root={voc}",
            f"voc.classes=[{','.join(SHAPES)}]",
            "protocol.costs=[0.1,10]",
            "protocol.folds=2",
            "protocol.workers=1",  # the file is what is tested; the process pools: tests/test_frozen.py
            f"cache_dir={tmp_path / 'cache'}",
        ],
        "retrieval": [
            "protocol=retrieval",
            f"retrieval.corpus={tiny_corpus}",
            f"retrieval.videos={tmp_path / 'videos.txt'}",
            "retrieval.candidates=other_videos",  # the file is what is tested; hard needs distractors cut
        ],
    }
    results = {}
    for name, extra in runs.items():
        out = subprocess.run(
            [*common, *extra, f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert results[name]["checkpoints"] == [spec]
    svm = results["svm"]
    assert set(svm["layers"]) == {"conv3", "conv5", "fc7"} and svm["protocol"]["resize"] == "goyal"
    assert svm["label"] == "svm:caffe:v1" and 0 <= svm["map"] <= 1
    retrieval = results["retrieval"]["retrieval"]
    assert 0 <= retrieval["fc7"]["recall_at_1"] <= 1 and retrieval["fc7"]["num_videos"] == 3


def test_detection_keeps_fc6_fc7_of_a_supervised_caffe_network_only(files, tmp_path):
    """R-CNN fine-tunes ImageNet's fc6/fc7 (a Caffe network with its fc8 classifier, as BVLC's);
    the paper re-initialises them for its video networks (no fc8)."""
    from vidrep.eval.finetune import keeps_fc

    folder, _, _ = files
    assert keeps_fc(load_network(f"caffe:{folder / 'layer.caffemodel'}"))
    write_caffemodel(tmp_path / "video.caffemodel", known_weights(fc8=False), v1=True)
    assert not keeps_fc(load_network(f"caffe:{tmp_path / 'video.caffemodel'}"))
    assert not keeps_fc(load_network("random"))


def test_a_supervised_caffe_network_is_reported_in_the_imagenet_rows():
    from vidrep.eval.report import default_row

    bvlc = ["caffe:/m/bvlc_reference_caffenet.caffemodel"]
    assert default_row("svm", None, bvlc, supervised=True) == "imagenet, no ft"
    assert default_row("detection", "straightforward", bvlc, supervised=True) == "imagenet + ft"
    assert default_row("detection", "straightforward", ["caffe:/m/color_model.caffemodel"]) == "unsup + ft"
    assert default_row("detection", "straightforward", ["imagenet:/w/alexnet.pth"]) == "imagenet + ft"
