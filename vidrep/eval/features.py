"""Networks to evaluate (a train.py checkpoint, a random init, ImageNet AlexNet weights) and their
frozen features of whole images: conv layers average-pooled to ~9K dims, pool5, fc6, fc7, each
L2-normalised (the Goyal et al. 2019 benchmark protocol)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vidrep.models.caffenet import FEATURE_LAYERS, CaffeNet, TorchvisionAlexNet
from vidrep.training.checkpoints import DamagedCheckpointError, load_verified

TARGET_DIMS = 9216  # conv maps are average-pooled to about this many values (Goyal et al.)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that is not what evaluate.py can load; the message names the file and the fix."""


@dataclass
class Network:
    name: str  # what results.json records: the checkpoint path, "random" or "imagenet:<path>"
    trunk: nn.Module  # forward_features(x, layers)
    input_size: int
    preprocess: Callable[[Tensor], Tensor]  # uint8 RGB [N, 3, S, S] -> network input
    key: str  # identifies the weights for caches


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
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt=<run dir>/checkpoints/last.ckpt, ckpt=random or ckpt=imagenet:<file>")
    try:
        ckpt = load_verified(path, "cpu", weights_only=True)
    except DamagedCheckpointError as e:
        raise CheckpointError(f"{e}; evaluate.py takes checkpoints written by train.py") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not state or "net.trunk.conv1.weight" not in state or "net.trunk.fc7.weight" not in state:
        raise CheckpointError(f"{path} is not a vidrep train.py checkpoint (no net.trunk.conv1..fc7 weights in its state_dict)")
    return ckpt


def load_checkpoint_trunk(path: str | Path, ckpt: dict | None = None) -> Network:
    """The CaffeNet trunk of a train.py checkpoint (`ckpt`: the checkpoint already read from `path`)."""
    path = Path(path).expanduser()
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    prefix = "net.trunk."
    trunk_state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    hp = ckpt.get("hyper_parameters", {})
    input_size = int(hp.get("input_size", 227))
    fc6_dim, fc7_dim = trunk_state["fc6.weight"].shape[0], trunk_state["fc7.weight"].shape[0]
    trunk = TorchvisionAlexNet(input_size, fc6_dim, fc7_dim) if "convs.0.weight" in trunk_state else CaffeNet(input_size, fc6_dim, fc7_dim)
    trunk.load_state_dict(trunk_state)
    mean = hp.get("pixel_mean", [107.99, 102.75, 96.64])
    return Network(str(path), trunk.eval(), input_size, mean_subtract(mean), _file_key(path))


def random_network(input_size: int = 227, fc6_dim: int = 4096, fc7_dim: int = 1024, seed: int = 0) -> Network:
    """The same architecture with the released random initialisation (the "scratch" baseline)."""
    torch.manual_seed(seed)
    trunk = CaffeNet(input_size, fc6_dim, fc7_dim)
    return Network("random", trunk.eval(), input_size, mean_subtract([107.99, 102.75, 96.64]), f"random-{input_size}-{fc6_dim}-{fc7_dim}-{seed}")


def imagenet_network(path: str | Path, input_size: int = 227) -> Network:
    """torchvision's ImageNet-supervised AlexNet from a local weights file (alexnet-owt-*.pth)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"ImageNet AlexNet weights {path} not found; vidrep never downloads weights. Put torchvision's "
            "alexnet-owt-7be5be79.pth there (torchvision.models.AlexNet_Weights.IMAGENET1K_V1) and pass ckpt=imagenet:<file>"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "features.0.weight" not in state or "classifier.4.weight" not in state:
        raise CheckpointError(f"{path} is not a torchvision AlexNet state_dict (no features.0 / classifier.4 weights)")
    trunk = TorchvisionAlexNet(input_size, 4096, 4096)
    mapping = {f"convs.{i}.": f"features.{j}." for i, j in enumerate((0, 3, 6, 8, 10))} | {"fc6.": "classifier.1.", "fc7.": "classifier.4."}
    trunk.load_state_dict({ours + p: state[theirs + p] for ours, theirs in mapping.items() for p in ("weight", "bias")})
    return Network(f"imagenet:{path}", trunk.eval(), input_size, _imagenet_normalise, _file_key(path))


def load_network(spec: str, *, input_size: int = 227, seed: int = 0) -> Network:
    if spec == "random":
        return random_network(input_size=input_size, seed=seed)
    if spec.startswith("imagenet:"):
        return imagenet_network(spec[len("imagenet:"):], input_size)
    return load_checkpoint_trunk(spec)


# Goyal et al.'s AlexNet VOC07 benchmark (facebookresearch/fair_self_supervision_benchmark,
# configs/benchmark_tasks/image_classification/voc07/*_extract_features.yaml: conv1_s4k19_resize,
# conv2_s3k12_resize, conv3_s1k9_resize, conv4_s1k9_resize, conv5_s1k8_resize): average pooling with
# these (kernel, stride) per layer, 9,216-9,600 values at 227 input.
GOYAL_POOLING = {"conv1": (19, 4), "conv2": (12, 3), "conv3": (9, 1), "conv4": (9, 1), "conv5": (8, 1)}


def fixed_pool(x: Tensor, kernel: int, stride: int) -> Tensor:
    """[N, C, H, W] average-pooled with a fixed kernel and stride, flattened; the kernel shrinks to
    the map when the input is smaller than the benchmark's 227 (e.g. the tests' 67)."""
    k = min(kernel, x.shape[-1], x.shape[-2])
    return torch.flatten(F.avg_pool2d(x, k, stride), 1)


def pool_to_dims(x: Tensor, target: int = TARGET_DIMS) -> Tensor:
    """[N, C, H, W] -> [N, C * s * s] with s chosen so C*s*s is about `target` (at most H)."""
    side = max(1, min(x.shape[-1], round(math.sqrt(target / x.shape[1]))))
    return torch.flatten(F.adaptive_avg_pool2d(x, side), 1)


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [3, size, size]: the whole image warped to the network's input (as R-CNN warps)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))


@torch.no_grad()
def extract_features(net: Network, images: Sequence[Path], layers: Sequence[str], batch_size: int = 64,
                     device: str = "cpu", pooling: str = "adaptive", desc: str | None = None) -> dict[str, np.ndarray]:
    """{layer: float32 [N, D]} L2-normalised features of whole images; conv maps pooled with
    GOYAL_POOLING (pooling="goyal") or adaptively to ~9K values (pooling="adaptive"). With `desc`,
    a progress bar of that name counts the images."""
    unknown = set(layers) - set(FEATURE_LAYERS)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; choose from {FEATURE_LAYERS}")
    trunk = net.trunk.to(device)
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    bar = tqdm(total=len(images), desc=desc, unit="image", disable=desc is None)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack([load_image(p, net.input_size) for p in images[start : start + batch_size]]))
        bar.update(len(batch))
        feats = trunk.forward_features(net.preprocess(batch.to(device)), layers)
        for name in layers:
            f = feats[name]
            if f.dim() == 4:
                f = fixed_pool(f, *GOYAL_POOLING[name]) if pooling == "goyal" and name in GOYAL_POOLING else pool_to_dims(f)
            out[name].append(F.normalize(f, dim=1).cpu().numpy().astype(np.float32))
    bar.close()
    return {name: np.concatenate(chunks) for name, chunks in out.items()}
