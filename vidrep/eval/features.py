"""Networks to evaluate (a train.py checkpoint, a random init, ImageNet AlexNet weights, a Caffe
file) and their frozen features of whole images: conv maps average-pooled to ~9K dims, flat layers
as they are, each L2-normalised (the Goyal et al. 2019 benchmark protocol). Any `vidrep.models.Trunk`
works: layer names, pooling kernels and the pixel mean come from the trunk; a checkpoint's trunk is
rebuilt from the network config it stores. Images are decoded and resized in DataLoader worker
processes while the network runs."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vidrep.models.caffenet import CaffeNet, TorchvisionAlexNet
from vidrep.models.trunk import Trunk, build_trunk
from vidrep.models.weights import read_weights_file
from vidrep.training.checkpoints import DamagedCheckpointError, load_verified

TARGET_DIMS = 9216  # conv maps are average-pooled to about this many values (Goyal et al.)
TRUNK_PREFIX = "net.trunk."  # the trunk's keys in a train.py checkpoint's state_dict
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that is not what evaluate.py can load; the message names the file and the fix."""


@dataclass
class Network:
    name: str  # what results.json records: the checkpoint path, "random" or "imagenet:<path>"
    trunk: Trunk
    input_size: int
    preprocess: Callable[[Tensor], Tensor]  # uint8 RGB [N, 3, S, S] -> network input
    key: str  # identifies the weights for caches


def trained_with_labels(net: Network) -> bool:
    """An ImageNet-supervised network: torchvision's ImageNet AlexNet (`imagenet:`), or a Caffe
    network that carries its fc8 classifier (BVLC's CaffeNet; the released video models have none)."""
    return net.name.startswith("imagenet:") or getattr(net.trunk, "fc8", None) is not None


def _subtract(mean: Tensor, x: Tensor) -> Tensor:
    return x.float() - mean.to(x.device)


def mean_subtract(mean: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """A picklable preprocess (fine-tuning's DDP ranks are spawned processes)."""
    return functools.partial(_subtract, torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))


def _imagenet_normalise(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.blake2b(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode(), digest_size=8).hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint, loaded with weights_only=True; errors name the file and the fix."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file; pass ckpt={path}/checkpoints/last.ckpt "
            "for a train.py run directory"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass ckpt=<run dir>/checkpoints/last.ckpt, ckpt=random or "
            "ckpt=imagenet:<file>"
        )
    try:
        ckpt = load_verified(path, "cpu", weights_only=True)
    except DamagedCheckpointError as e:
        raise CheckpointError(f"{e}; evaluate.py takes checkpoints written by train.py") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not state:
        has_trunk = False
    elif _stored_net_config(ckpt) is not None:  # names its trunk's class: any trunk
        has_trunk = any(k.startswith(TRUNK_PREFIX) for k in state)
    else:  # from before checkpoints stored their network: a CaffeNet-family trunk
        conv1 = f"{TRUNK_PREFIX}conv1.weight" in state or f"{TRUNK_PREFIX}convs.0.weight" in state
        has_trunk = conv1 and f"{TRUNK_PREFIX}fc7.weight" in state
    if not has_trunk:
        raise CheckpointError(
            f"{path} is not a vidrep train.py checkpoint (no {TRUNK_PREFIX}* trunk weights in its state_dict)"
        )
    return ckpt


def _stored_net_config(ckpt) -> dict | None:
    """The network config a checkpoint stores (hyper_parameters["net"], TripletModule saves it); None in older ones."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    net = hp.get("net") if isinstance(hp, dict) else None
    return net if isinstance(net, dict) and isinstance(net.get("trunk"), dict) else None


def _legacy_trunk(trunk_state: dict[str, Tensor], input_size: int) -> Trunk:
    """A checkpoint from before checkpoints stored their network: CaffeNet, or torchvision's AlexNet
    (its `convs.*` keys), with the fc sizes of its weights."""
    fc6_dim, fc7_dim = trunk_state["fc6.weight"].shape[0], trunk_state["fc7.weight"].shape[0]
    return (TorchvisionAlexNet if "convs.0.weight" in trunk_state else CaffeNet)(input_size, fc6_dim, fc7_dim)


def checkpoint_trunk(path: Path, ckpt: dict) -> Trunk:
    """The trunk of a checkpoint read by `read_checkpoint`, built from its stored config, its weights loaded."""
    trunk_state = {k[len(TRUNK_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(TRUNK_PREFIX)}
    input_size = int(ckpt.get("hyper_parameters", {}).get("input_size", 227))
    stored = _stored_net_config(ckpt)
    try:
        trunk = _legacy_trunk(trunk_state, input_size) if stored is None else build_trunk(stored["trunk"])
        trunk.load_state_dict(trunk_state)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: its trunk cannot be rebuilt from the network config it stores ({str(e)[:300]})"
        ) from None
    return trunk.eval()


def load_checkpoint_trunk(path: str | Path, ckpt: dict | None = None) -> Network:
    """The trunk of a train.py checkpoint (`ckpt`: the checkpoint already read from `path`)."""
    path = Path(path).expanduser()
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    trunk = checkpoint_trunk(path, ckpt)
    hp = ckpt.get("hyper_parameters", {})
    mean = hp.get("pixel_mean", trunk.pixel_mean)
    return Network(str(path), trunk, trunk.input_size, mean_subtract(mean), _file_key(path))


def random_network(
    input_size: int = 227, fc6_dim: int = 4096, fc7_dim: int = 1024, seed: int = 0, trunk_config: dict | None = None
) -> Network:
    """The untrained network (the "scratch" baseline): the trunk `trunk_config` names (a resolved
    `model.net.trunk` node) at `input_size`, else CaffeNet with the released initialisation."""
    torch.manual_seed(seed)
    if trunk_config is None:
        trunk, key = CaffeNet(input_size, fc6_dim, fc7_dim), f"random-{input_size}-{fc6_dim}-{fc7_dim}-{seed}"
    else:
        trunk = build_trunk(trunk_config, input_size=input_size)
        text = json.dumps([trunk.config(), dict(trunk_config)], sort_keys=True, default=str)
        key = f"random-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}-{seed}"
    return Network("random", trunk.eval(), input_size, mean_subtract(trunk.pixel_mean), key)


def imagenet_network(path: str | Path, input_size: int = 227) -> Network:
    """torchvision's ImageNet-supervised AlexNet from a local weights file (alexnet-owt-*.pth)."""
    path = Path(path).expanduser()
    state = read_weights_file(
        path,
        "ImageNet AlexNet",
        "Put torchvision's alexnet-owt-7be5be79.pth there (torchvision.models.AlexNet_Weights.IMAGENET1K_V1) "
        "and pass ckpt=imagenet:<file>",
        CheckpointError,
    )
    if "features.0.weight" not in state or "classifier.4.weight" not in state:
        raise CheckpointError(f"{path} is not a torchvision AlexNet state_dict (no features.0 / classifier.4 weights)")
    trunk = TorchvisionAlexNet(input_size, 4096, 4096)
    mapping = {f"convs.{i}.": f"features.{j}." for i, j in enumerate((0, 3, 6, 8, 10))} | {
        "fc6.": "classifier.1.",
        "fc7.": "classifier.4.",
    }
    trunk.load_state_dict({ours + p: state[theirs + p] for ours, theirs in mapping.items() for p in ("weight", "bias")})
    return Network(f"imagenet:{path}", trunk.eval(), input_size, _imagenet_normalise, _file_key(path))


def caffe_network(spec: str) -> Network:
    """The network of Caffe files, `caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray]`
    (vidrep/models/caffe.py), at its own input size."""
    from vidrep.models.caffe import CaffeFileError, parse_spec, trunk_from_spec

    try:
        trunk = trunk_from_spec(spec)
        key = f"caffe-{parse_spec(spec).key()}"
    except (CaffeFileError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return Network(spec, trunk, trunk.input_size, mean_subtract(trunk.pixel_mean), key)


def load_network(spec: str, *, input_size: int = 227, seed: int = 0, trunk_config: dict | None = None) -> Network:
    """`spec`: a checkpoint path, "random" (the trunk `trunk_config` names, CaffeNet without one),
    "imagenet:<file>" or "caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray]"."""
    if spec == "random":
        return random_network(input_size=input_size, seed=seed, trunk_config=trunk_config)
    if spec.startswith("imagenet:"):
        return imagenet_network(spec[len("imagenet:") :], input_size)
    if spec.startswith("caffe:"):
        return caffe_network(spec)
    return load_checkpoint_trunk(spec)


def fixed_pool(x: Tensor, kernel: int, stride: int) -> Tensor:
    """[N, C, H, W] average-pooled with a fixed kernel and stride (a trunk's `fixed_pooling`),
    flattened; the kernel shrinks to the map when the input is smaller than the benchmark's (e.g.
    the tests' 67)."""
    k = min(kernel, x.shape[-1], x.shape[-2])
    return torch.flatten(F.avg_pool2d(x, k, stride), 1)


def pool_to_dims(x: Tensor, target: int = TARGET_DIMS) -> Tensor:
    """[N, C, H, W] -> [N, C * s * s] with s chosen so C*s*s is about `target` (at most H)."""
    side = max(1, min(x.shape[-1], round(math.sqrt(target / x.shape[1]))))
    return torch.flatten(F.adaptive_avg_pool2d(x, side), 1)


RESIZES = ("goyal", "warp")
GOYAL_SCALE = 256  # fair_self_supervision_benchmark core/config.py: TRAIN.SCALE = TEST.SCALE = 256


def goyal_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Goyal et al.'s VOC07 feature-extraction resize (fair_self_supervision_benchmark,
    data/data_input.py transform_image with caffenet_bvlc_*_extract_features.yaml's DATA_TRANSFORMS
    [scale, global_resize]; data/data_transformation.py): the shorter side to 256, the longer
    floor(long / short x 256) (unchanged when the shorter side is 256 already), then the whole image
    to size x size, both with cv2.resize's default bilinear interpolation on float32 (their image
    is float32 from cv2.imread on); the test split's centre crop to size is then a no-op. HWC in, float32 out."""
    img = img.astype(np.float32)
    h, w = img.shape[:2]
    if min(h, w) != GOYAL_SCALE:
        if w < h:
            new_w, new_h = GOYAL_SCALE, int(np.floor(h / w * GOYAL_SCALE))
        else:
            new_w, new_h = int(np.floor(w / h * GOYAL_SCALE)), GOYAL_SCALE
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def load_image(path: Path, size: int, resize: str = "warp") -> np.ndarray:
    """RGB [3, size, size] of the whole image: `warp`, one INTER_AREA resize to the network's input,
    uint8; `goyal`, Goyal et al.'s two bilinear resizes (`goyal_resize`), float32 0-255."""
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; choose from {RESIZES}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if resize == "goyal":
        img = goyal_resize(img, size)
    else:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))


class WholeImages(Dataset):
    """The images of `paths` as `load_image` gives them, one per item (decoded in loader workers)."""

    def __init__(self, paths: Sequence[Path], size: int, resize: str = "warp") -> None:
        self.paths, self.size, self.resize = list(paths), size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(load_image(self.paths[i], self.size, self.resize))


@torch.no_grad()
def extract_features(
    net: Network,
    images: Sequence[Path],
    layers: Sequence[str],
    batch_size: int = 64,
    device: str = "cpu",
    pooling: str = "adaptive",
    desc: str | None = None,
    workers: int = 0,
    resize: str = "warp",
) -> dict[str, np.ndarray]:
    """{layer: float32 [N, D]} L2-normalised features of whole images (`load_image`'s `resize`);
    conv maps pooled with the trunk's `fixed_pooling` (pooling="goyal") or adaptively to ~9K values
    (pooling="adaptive"). `workers` DataLoader processes decode and resize the images (0: this
    process); the batches, and so the features, are the same for any number. With `desc`, a
    progress bar of that name counts the images."""
    trunk = net.trunk.to(device)
    trunk.check_layers(layers)
    kernels = trunk.fixed_pooling if pooling == "goyal" else {}
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    bar = tqdm(total=len(images), desc=desc, unit="image", disable=desc is None)
    loader = DataLoader(
        WholeImages(images, net.input_size, resize),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=str(device).startswith("cuda"),
    )
    for batch in loader:
        bar.update(len(batch))
        feats = trunk.forward_features(net.preprocess(batch.to(device)), layers)
        for name in layers:
            f = feats[name]
            if f.dim() == 4:
                f = fixed_pool(f, *kernels[name]) if name in kernels else pool_to_dims(f)
            out[name].append(F.normalize(f, dim=1).cpu().numpy().astype(np.float32))
    bar.close()
    return {name: np.concatenate(chunks) for name, chunks in out.items()}
