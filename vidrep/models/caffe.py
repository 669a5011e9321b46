"""Caffe files in, no Caffe needed: a CaffeNet-family `.caffemodel` (and its `.binaryproto` mean
image) as a vidrep trunk, read with the `protobuf` library.

    python -m vidrep.models.caffe convert <net.caffemodel> <out.ckpt> [--mean <mean.binaryproto>] [--gray]

writes a checkpoint that evaluate.py (`ckpt=<out.ckpt>`) and train.py read like any other;
`ckpt=caffe:<spec>` (evaluate.py) and `model.init_from=caffe:<spec>` (train.py) read the files
directly, with spec `<net.caffemodel>[+mean:<mean.binaryproto>][+gray]` (`+`, because Hydra's
override grammar takes neither `=` nor `,` inside a value).

The message classes are built at import from the parts of BVLC caffe's src/caffe/proto/caffe.proto
that a trained network's file uses (NetParameter, LayerParameter, V1LayerParameter, BlobProto,
BlobShape), with caffe.proto's own field numbers; every other field of a file is kept by protobuf
as an unknown field and ignored. Both layer formats are read: `layer` (LayerParameter, blobs with a
`shape`) and the deprecated `layers` (V1LayerParameter, blobs with num/channels/height/width) of
2014-15 files such as the paper's released models.

Caffe's conventions are kept in the trunk (vidrep/models/caffenet.py): BGR input, 0-255, minus the
mean image (centre-cropped to the input as R-CNN's rcnn_create_model.m does) and Caffe's ceil-mode
pooling; `--gray` (the released gray model) feeds the grey image as 3 equal channels. Grouped
convolutions and fc6's input order (pool5 flattened channel-major, [C, H, W]) are the same in Caffe
and PyTorch, so blobs are copied as they are; a shape that does not fit is an error naming the layer.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from vidrep.common.checkpoint_files import save_hashed
from vidrep.models.caffenet import PIXEL_MEAN, CaffeNet, pool5_size
from vidrep.models.embedding import EmbeddingNet

PREFIX = "caffe:"
SPEC_FORM = "caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray]"
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")
REQUIRED = (*CONV_LAYERS, "fc6", "fc7")
# caffe.proto's layer types of the layers read here, in both formats (V1LayerParameter.LayerType values)
CONVOLUTION = ("Convolution", "CONVOLUTION")
INNER_PRODUCT = ("InnerProduct", "INNER_PRODUCT")
# Trunk implementation choices a converted network may take from the configured trunk (train.py's
# model.net.trunk): they change speed, not outputs or parameters.
IMPLEMENTATION_KEYS = ("lrn", "conv1_in_channels", "grouped_conv")


class CaffeFileError(ValueError):
    """A Caffe file vidrep cannot read as a CaffeNet; the message names the file or layer and the fix."""


# ---------------------------------------------------------------- caffe.proto, the parts read here

# V1LayerParameter.LayerType, all of BVLC caffe.proto's values (a file may hold any of them).
_V1_TYPES = {
    "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3, "CONTRASTIVE_LOSS": 37,
    "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39, "DROPOUT": 6, "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7,
    "ELTWISE": 25, "EXP": 38, "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11,
    "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15, "MEMORY_DATA": 29,
    "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17, "POWER": 26, "RELU": 18, "SIGMOID": 19,
    "SIGMOID_CROSS_ENTROPY_LOSS": 27, "SILENCE": 36, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22,
    "SLICE": 33, "TANH": 23, "WINDOW_DATA": 24, "THRESHOLD": 31,
}  # fmt: skip

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, label, message or enum type name, packed)]) as in caffe.proto
_MESSAGES = [
    ("BlobShape", [("dim", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, None, True)]),
    (
        "BlobProto",
        [
            ("shape", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".caffe.BlobShape", False),
            ("data", 5, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True),
            ("diff", 6, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True),
            ("double_data", 8, _F.TYPE_DOUBLE, _F.LABEL_REPEATED, None, True),
            ("double_diff", 9, _F.TYPE_DOUBLE, _F.LABEL_REPEATED, None, True),
            ("num", 1, _F.TYPE_INT64, _F.LABEL_OPTIONAL, None, False),
            ("channels", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, None, False),
            ("height", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL, None, False),
            ("width", 4, _F.TYPE_INT64, _F.LABEL_OPTIONAL, None, False),
        ],
    ),
    (
        "LayerParameter",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("type", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("bottom", 3, _F.TYPE_STRING, _F.LABEL_REPEATED, None, False),
            ("top", 4, _F.TYPE_STRING, _F.LABEL_REPEATED, None, False),
            ("blobs", 7, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".caffe.BlobProto", False),
        ],
    ),
    (
        "V1LayerParameter",
        [
            ("bottom", 2, _F.TYPE_STRING, _F.LABEL_REPEATED, None, False),
            ("top", 3, _F.TYPE_STRING, _F.LABEL_REPEATED, None, False),
            ("name", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("type", 5, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".caffe.V1LayerParameter.LayerType", False),
            ("blobs", 6, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".caffe.BlobProto", False),
        ],
    ),
    (
        "NetParameter",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
            ("layers", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".caffe.V1LayerParameter", False),
            ("layer", 100, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".caffe.LayerParameter", False),
        ],
    ),
]


def _build_messages() -> dict[str, type]:
    """The message classes, from a FileDescriptorProto made here (no protoc, no generated code)."""
    file = descriptor_pb2.FileDescriptorProto(name="vidrep_caffe.proto", package="caffe", syntax="proto2")
    for name, fields in _MESSAGES:
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name, packed in fields:
            f = message.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True
        if name == "V1LayerParameter":
            enum = message.enum_type.add(name="LayerType")
            for value_name, number in _V1_TYPES.items():
                enum.value.add(name=value_name, number=number)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}")) for name, _ in _MESSAGES}


MESSAGES = _build_messages()
NetParameter, LayerParameter = MESSAGES["NetParameter"], MESSAGES["LayerParameter"]
V1LayerParameter = MESSAGES["V1LayerParameter"]
BlobProto, BlobShape = MESSAGES["BlobProto"], MESSAGES["BlobShape"]


# ---------------------------------------------------------------- reading


@dataclass
class CaffeLayer:
    name: str
    type: str
    blobs: list[np.ndarray]  # float32, in the blob's own shape (V1: num, channels, height, width)


def blob_array(blob, where: str) -> np.ndarray:
    """A BlobProto's values as float32 in its shape (`shape`, else the deprecated 4-D num/channels/height/width)."""
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    values = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if int(np.prod(dims)) != values.size:
        raise CaffeFileError(f"{where}: the blob's shape {dims} does not hold its {values.size} values")
    return values.reshape(dims)


def _read_message(path: Path, cls, what: str):
    path = Path(path).expanduser()
    if not path.is_file():
        raise CaffeFileError(f"{what} {path} not found; vidrep never downloads Caffe files")
    message = cls()
    try:
        message.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as e:
        raise CaffeFileError(f"{path} is not a {what} (protobuf cannot parse it: {str(e)[:200]})") from None
    return message


def read_caffemodel(path: str | Path) -> dict[str, CaffeLayer]:
    """{name: CaffeLayer} of the layers of a `.caffemodel` that hold parameters, from either format."""
    path = Path(path).expanduser()
    net = _read_message(path, NetParameter, "caffemodel")
    v1_names = {number: name for name, number in _V1_TYPES.items()}
    layers = [(layer.name, layer.type, layer.blobs) for layer in net.layer]
    layers += [(layer.name, v1_names.get(layer.type, str(layer.type)), layer.blobs) for layer in net.layers]
    if not layers or not all(name for name, _, _ in layers):
        raise CaffeFileError(
            f"{path} is not a caffemodel (no named layers in a NetParameter); pass a trained network's .caffemodel "
            "(a .prototxt holds no weights)"
        )
    out = {}
    for name, kind, blobs in layers:
        if blobs:
            out[name] = CaffeLayer(name, kind, [blob_array(b, f"{path} layer {name!r}") for b in blobs])
    if not out:
        raise CaffeFileError(f"{path} holds layers but no weights (a deploy definition?); pass the .caffemodel")
    return out


def read_mean(path: str | Path) -> np.ndarray:
    """The [3, H, W] float32 mean image of a `.binaryproto` (Caffe's channel order: BGR for colour models)."""
    path = Path(path).expanduser()
    mean = blob_array(_read_message(path, BlobProto, "mean binaryproto"), str(path))
    mean = mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 and int(np.prod(mean.shape[:-3])) == 1 else mean
    if mean.ndim != 3 or mean.shape[0] != 3 or min(mean.shape[1:]) < 1:
        raise CaffeFileError(f"{path} is not a 3-channel mean image (its blob is {list(mean.shape)})")
    return mean


def _fit(array: np.ndarray, ndim: int, where: str) -> np.ndarray:
    """A blob as a `ndim`-D array: V1 files store fc weights as [1, 1, out, in] and biases as [1, 1, 1, out]."""
    dims = list(array.shape)
    while len(dims) > ndim and dims[0] == 1:
        dims.pop(0)
    if len(dims) != ndim:
        raise CaffeFileError(f"{where}: a {ndim}-D blob was expected, the file has {list(array.shape)}")
    return array.reshape(dims)


# ---------------------------------------------------------------- the trunk


def caffe_state(layers: dict[str, CaffeLayer], path: Path) -> dict[str, torch.Tensor]:
    """CaffeNet state-dict tensors of conv1..conv5, fc6, fc7 (and fc8) from the file's layers."""
    missing = [name for name in REQUIRED if name not in layers]
    unknown = [name for name in layers if name not in (*CONV_LAYERS, *FC_LAYERS)]
    if missing:
        raise CaffeFileError(
            f"{path}: no weights for layer(s) {missing}; a CaffeNet has {list(REQUIRED)} (its layers: {list(layers)})"
        )
    if unknown:
        raise CaffeFileError(
            f"{path}: layer(s) {unknown} hold weights that a CaffeNet (conv1..conv5, fc6, fc7, fc8) has no place for"
        )
    state = {}
    for name, layer in layers.items():
        conv = name in CONV_LAYERS
        if layer.type not in (CONVOLUTION if conv else INNER_PRODUCT):
            raise CaffeFileError(
                f"{path}: layer {name!r} is a {layer.type}, not a {'Convolution' if conv else 'InnerProduct'}"
            )
        if len(layer.blobs) != 2:
            raise CaffeFileError(f"{path}: layer {name!r} has {len(layer.blobs)} blobs, not a weight and a bias")
        where = f"{path} layer {name!r}"
        state[f"{name}.weight"] = torch.from_numpy(_fit(layer.blobs[0], 4 if conv else 2, where).copy())
        state[f"{name}.bias"] = torch.from_numpy(_fit(layer.blobs[1], 1, where).copy())
    return state


def caffe_trunk(model: str | Path, mean: str | Path | None = None, gray: bool = False, **implementation) -> CaffeNet:
    """The CaffeNet of a `.caffemodel` with Caffe's input conventions (BGR, the `mean` image, ceil
    pooling; `gray`: grey input as 3 channels), in eval mode; `implementation`: IMPLEMENTATION_KEYS."""
    path = Path(model).expanduser()
    state = caffe_state(read_caffemodel(path), path)
    fc6_in, fc6_dim = state["fc6.weight"].shape[1], state["fc6.weight"].shape[0]
    fc7_dim = state["fc7.weight"].shape[0]
    fc8_dim = state["fc8.weight"].shape[0] if "fc8.weight" in state else 0
    input_size = 227
    expected = 256 * pool5_size(input_size, ceil=True) ** 2
    if fc6_in != expected:
        raise CaffeFileError(
            f"{path} layer 'fc6': it takes {fc6_in} inputs, a CaffeNet's pool5 at {input_size} gives {expected} "
            "(256 x 6 x 6); this is not a CaffeNet"
        )
    if mean is None:  # the released mean image's channel means
        mean_image, pixel_mean = None, list(PIXEL_MEAN)
    else:
        mean_image = torch.from_numpy(read_mean(mean))
        # the channel means in RGB (the file is BGR); the trunk subtracts the rest of the image itself
        pixel_mean = [float(v) for v in mean_image.double().mean(dim=(1, 2)).flip(0)]
    unknown = set(implementation) - set(IMPLEMENTATION_KEYS)
    if unknown:
        raise ValueError(f"caffe_trunk takes only the implementation keys {IMPLEMENTATION_KEYS}, not {sorted(unknown)}")
    trunk = CaffeNet(
        input_size,
        fc6_dim,
        fc7_dim,
        fc8_dim=fc8_dim,
        bgr=True,
        gray=gray,
        mean_image_size=None if mean_image is None else list(mean_image.shape[1:]),
        pixel_mean=pixel_mean,
        pool_ceil=True,
        **implementation,
    )
    if mean_image is not None:
        state["mean_image"] = mean_image
    try:
        trunk.load_state_dict(state)
    except RuntimeError as e:  # a size mismatch names the parameter, i.e. the layer
        raise CaffeFileError(f"{path}: its weights do not fit a CaffeNet ({_first_mismatch(str(e))})") from None
    return trunk.eval()


def _first_mismatch(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if "size mismatch" in line or "Missing" in line]
    return lines[0][:300] if lines else message[:300]


@dataclass(frozen=True)
class CaffeSpec:
    model: Path
    mean: Path | None = None
    gray: bool = False

    def key(self) -> str:
        """Identifies the files and options, for caches (path, size and mtime of each file)."""
        parts = [str(self.gray)]
        for p in (self.model, self.mean):
            if p is not None:
                st = p.stat()
                parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def parse_spec(spec: str) -> CaffeSpec:
    """`caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray]` -> CaffeSpec."""
    if not spec.startswith(PREFIX):
        raise ValueError(
            f"{spec!r} is not a caffe: spec; write caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray]"
        )
    model, *options = spec[len(PREFIX) :].split("+")
    mean, gray = None, False
    for option in options:
        if option == "gray":
            gray = True
        elif option.startswith("mean:"):
            mean = Path(option[len("mean:") :]).expanduser()
        else:
            raise ValueError(f"{spec!r}: unknown option {option!r}; the options are +mean:<mean.binaryproto> and +gray")
    return CaffeSpec(Path(model).expanduser(), mean, gray)


def spec_files(spec: str) -> list[str]:
    """The files a caffe: spec names (for evaluate.py's checks before it starts)."""
    s = parse_spec(spec)
    return [str(s.model)] + ([str(s.mean)] if s.mean is not None else [])


def trunk_from_spec(spec: str, **implementation) -> CaffeNet:
    s = parse_spec(spec)
    return caffe_trunk(s.model, s.mean, s.gray, **implementation)


def init_from(net: EmbeddingNet, spec: str) -> EmbeddingNet:
    """train.py's `model.init_from`: the network a Caffe file holds, in place of the configured
    one, keeping the configured trunk's implementation choices (IMPLEMENTATION_KEYS)."""
    if not str(spec).startswith(PREFIX):
        raise ValueError(
            f"model.init_from={spec!r}: it takes {SPEC_FORM} (to continue a vidrep run, use ckpt_path=<checkpoint>)"
        )
    configured = net.trunk.config()
    implementation = {k: configured[k] for k in IMPLEMENTATION_KEYS if k in configured}
    trunk = trunk_from_spec(str(spec), **implementation)
    if trunk.input_size != net.trunk.input_size:
        raise ValueError(
            f"model.init_from={spec}: the Caffe network takes {trunk.input_size} px input, model.input_size is "
            f"{net.trunk.input_size}; set model.input_size={trunk.input_size} and data.input_size={trunk.input_size}"
        )
    return type(net)(trunk.train())


def checkpoint_of(trunk: CaffeNet, source: dict) -> dict:
    """The checkpoint evaluate.py and train.py read (what TripletModule's checkpoints hold for
    them): the trunk's tensors under net.trunk.*, and plain hyper-parameters (its network config,
    input size, channel means) plus where it came from."""
    return {
        "state_dict": {f"net.trunk.{k}": v.detach().clone() for k, v in trunk.state_dict().items()},
        "hyper_parameters": {
            "input_size": trunk.input_size,
            "pixel_mean": [float(v) for v in trunk.pixel_mean],
            "net": EmbeddingNet(trunk).config(),
            "caffe": source,
        },
    }


def convert(model: str | Path, out: str | Path, mean: str | Path | None = None, gray: bool = False) -> Path:
    """Write `out`, a vidrep checkpoint of the Caffe network, through the project's checkpoint writer
    (tensor hashes, atomic write)."""
    trunk = caffe_trunk(model, mean, gray)
    source = {"caffemodel": str(Path(model).expanduser()), "mean": None if mean is None else str(mean), "gray": gray}
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hashed(checkpoint_of(trunk, source), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidrep.models.caffe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="a .caffemodel (+ mean .binaryproto) -> a vidrep checkpoint")
    c.add_argument("caffemodel", type=Path)
    c.add_argument("out", type=Path, help="the checkpoint to write (e.g. color_model.ckpt)")
    c.add_argument("--mean", type=Path, default=None, help="the mean image (.binaryproto) the network was trained with")
    c.add_argument("--gray", action="store_true", help="the gray model: grey images as 3 channels")
    args = parser.parse_args(argv)
    try:
        out = convert(args.caffemodel, args.out, args.mean, args.gray)
    except CaffeFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.mean is None:
        print(
            "note: no --mean given: the network subtracts the released video model's channel means "
            f"(RGB {', '.join(f'{v:g}' for v in PIXEL_MEAN)}); pass --mean <mean.binaryproto> for the file's own mean",
            file=sys.stderr,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
