"""What every trunk declares, so that training, feature extraction and detection take any trunk.

A trunk maps mean-subtracted RGB images (0-255 minus `pixel_mean`, no scaling) of side
`input_size` to an `out_dim` embedding (L2-normalised by `EmbeddingNet`), and names its
intermediate features: `forward_features(x, layers)` returns any of `feature_layers`, shallow to
deep. Downstream code reads only this interface:

- the svm and retrieval protocols pool the 4-D maps of `feature_layers` (`fixed_pooling`: a
  (kernel, stride) per layer for `pooling=goyal`; `benchmark_layers`: the layers evaluated when
  the protocol names none);
- detection takes whole warped regions through `pooled_layer` (a flat feature), or RoI-pools
  `region_layer` (nominal stride `region_stride` in input pixels) to a `region_cells` grid and
  finishes it with `pool_regions`, giving the same width as `pooled_layer`;
- fine-tuning copies the parameters outside `head_prefixes` (the body) between networks;
- checkpoints store `config()`, from which `build_trunk` makes the same network again.

Constructor arguments are recorded as the trunk is made (`config()`), so a trunk needs no code
of its own for that; arguments whose effect is carried by the weights and that a rebuild must not
repeat (a weights file that need not exist where the checkpoint is evaluated) are named in
`rebuild_defaults`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def _plain(value: Any) -> Any:
    """Tuples as lists, so the config loads with torch.load(weights_only=True) and reads as YAML."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class Trunk(nn.Module):
    """The interface (see the module doc); subclasses set the class attributes and implement
    `forward_features` and `out_dim`."""

    feature_layers: ClassVar[tuple[str, ...]] = ()
    benchmark_layers: ClassVar[tuple[str, ...]] = ()
    fixed_pooling: ClassVar[dict[str, tuple[int, int]]] = {}
    pooled_layer: ClassVar[str] = ""
    region_layer: ClassVar[str] = ""
    region_stride: ClassVar[int] = 1
    region_cells: ClassVar[int] = 1
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    pixel_mean: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    rebuild_defaults: ClassVar[dict[str, Any]] = {}

    input_size: int

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def forward_features(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, (self.feature_layers[-1],))[self.feature_layers[-1]]

    def pool_regions(self, cells: Tensor) -> Tensor:
        """[R, C, k, k] RoI-pooled cells of `region_layer` -> [R, D] as `pooled_layer` (default: flattened)."""
        return torch.flatten(cells, 1)

    def check_layers(self, layers: Iterable[str]) -> list[str]:
        layers = list(layers)
        unknown = [name for name in layers if name not in self.feature_layers]
        if unknown:
            raise ValueError(
                f"unknown feature layers {unknown} for {type(self).__name__}; choose from {self.feature_layers}"
            )
        return layers

    def body_state(self) -> dict[str, Tensor]:
        """The state outside the embedding head: what detection's iterative fine-tuning copies."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.head_prefixes)}

    @torch.no_grad()
    def feature_shapes(
        self, input_size: int | None = None, layers: Iterable[str] | None = None
    ) -> dict[str, tuple[int, ...]]:
        """{layer: shape of one image's feature} of `layers` (default: all) at `input_size` (default:
        the trunk's), measured; layers past a flattening need the trunk's own input size."""
        size = input_size or self.input_size
        layers = self.feature_layers if layers is None else self.check_layers(layers)
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
            return {k: tuple(v.shape[1:]) for k, v in self.forward_features(x, layers).items()}
        finally:
            self.train(was_training)

    def config(self) -> dict[str, Any]:
        """{"_target_": class path, **constructor arguments}: what `build_trunk` rebuilds it from."""
        cls = type(self)
        target = f"{cls.__module__}.{cls.__qualname__}"
        return {"_target_": target, **_plain(self._init_args), **_plain(self.rebuild_defaults)}


def _recording(init):
    """`init` that first records its bound arguments (the outermost subclass's call wins)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "_init_args" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[name] = value
            # plain attribute set before nn.Module.__init__ has made its registries
            object.__setattr__(self, "_init_args", recorded)
        init(self, *args, **kwargs)

    return __init__


def trunk_class(target: str) -> type[Trunk]:
    """The Trunk subclass a `_target_` names; anything else is refused (a checkpoint names it)."""
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"trunk class {target!r} cannot be imported ({e}); is the package that defines it installed?"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Trunk)):
        raise ValueError(f"{target!r} is not a vidrep.models.Trunk subclass")
    return cls


def build_trunk(config: dict[str, Any], **overrides: Any) -> Trunk:
    """The trunk a `config()` (or a Hydra `model.net.trunk` node, resolved) describes."""
    args = {**{k: v for k, v in config.items() if k != "_target_"}, **overrides}
    return trunk_class(str(config["_target_"]))(**args)
