"""The quantizer interface every method implements, and the registry that finds them.

A method is one module in this package defining a `Quantizer` subclass decorated with
`@register`: a unique `name`, a frozen dataclass `Config` of its arguments (the recipe's
`method.args`, set with `--method-arg KEY=VALUE`, recorded in the checkpoint as method_args;
each field typed by its default, ranges checked in `__post_init__` with SFMPError),
`needs_inputs` if it reads calibration inputs, and:
- `prepare_layer` (optional): sees a full-precision decoder layer and the inputs of its targets
  before anything in it is quantized, and may rewrite it exactly (AWQ's scale folding);
- `quantize`: one target's weight in its *reordered* order (rows by descending salience,
  columns in the shared input order) and the bit-width of every block -> integer codes and one
  asymmetric (scale, zero) pair per row and input group.
A method whose Config has `clip = "fisher"` weighs its rounding errors by the Fisher diagonal
(`needs_fisher`): the pipeline then hands it every target's Fisher, reordered (`fisher`).
offline.sequential drives every method, one decoder layer at a time. Packing into bit planes
happens after, in sfmp_serve.bitplanes, so no quantizer knows the storage format.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, TypeVar

import torch
from torch import nn

from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry


@dataclass
class QuantizedCodes:
    codes: torch.Tensor  # uint8 [N, K], each in [0, 2^b - 1] for its block's b
    scale: torch.Tensor  # float32 [N, n_groups], > 0
    zero: torch.Tensor  # float32 [N, n_groups], integer-valued, in [0, 2^b - 1]


@dataclass
class LinearContext:
    """What a quantizer may use besides the weight (None where the method needs nothing)."""

    inputs: torch.Tensor | None = None  # calibration inputs [T, K], reordered columns
    name: str = ""  # full name of the target

    def require_inputs(self, method: str) -> torch.Tensor:
        """The calibration inputs, for methods that cannot work without them."""
        if self.inputs is None:
            raise SFMPError(f"method {method} needs calibration inputs (run it through "
                            "offline.sequential)")
        return self.inputs


@dataclass(frozen=True)
class NoConfig:
    """A method without arguments."""


CLIPS = ("minmax", "fisher")  # the `clip` argument of the methods that take one


class Quantizer(ABC):
    name: ClassVar[str]
    needs_inputs: ClassVar[bool] = False
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or self.Config(), **overrides)
        # Full target name -> its Fisher diagonal, reordered like the weight (set by the
        # pipeline for methods that need it).
        self.fisher: Mapping[str, torch.Tensor] | None = None

    @property
    def needs_fisher(self) -> bool:
        """Whether `quantize` weighs errors by the Fisher diagonal (Config.clip == "fisher")."""
        return getattr(self.config, "clip", None) == "fisher"

    def target_fisher(self, context: LinearContext) -> torch.Tensor:
        """The reordered Fisher diagonal of the target being quantized."""
        if self.fisher is None or context.name not in self.fisher:
            raise SFMPError(f"method {self.name} with clip=fisher needs the Fisher diagonal of "
                            f"{context.name or 'the target'} (run it through the pipeline)")
        return self.fisher[context.name]

    @property
    def method_args(self) -> dict[str, Any]:
        """The method's arguments as the checkpoint records them."""
        return dataclasses.asdict(self.config)

    def prepare_layer(self, layer: nn.Module, spec: ArchSpec, plans: Mapping[str, Any],
                      inputs: Mapping[str, torch.Tensor], layer_name: str = "") -> list[str]:
        """Rewrite a full-precision decoder layer before it is quantized; plans and inputs
        ([T, K], original column order) are keyed by name inside the layer. Returns the names
        of the parameters it changed. Called only for methods with needs_inputs."""
        return []

    @abstractmethod
    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        """weight: float32 [N, K] reordered; block_bits: uint8 [n_block_rows, n_groups]."""


def row_group_bits(block_bits: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Bit-width of every (row, group), [N, n_groups] int64."""
    return block_bits.to(torch.int64).repeat_interleave(geometry.rows(), dim=0)


_REGISTRY: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])


def register(cls: Q) -> Q:
    """Class decorator: make a Quantizer available as `--method <cls.name>`."""
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise SFMPError(f"method name {cls.name!r} is taken by {other.__module__}."
                        f"{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package, so each method registers itself."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")


def methods() -> dict[str, type[Quantizer]]:
    """Registered methods by name."""
    _discover()
    return dict(_REGISTRY)


def _method(name: str) -> type[Quantizer]:
    known = methods()
    if name not in known:
        raise SFMPError(f"--method={name!r}: expected one of {', '.join(sorted(known))}")
    return known[name]


def method_config(name: str, args: Mapping[str, Any] | None = None,
                  where: str = "recipe") -> Any:
    """The Config of method `name` with `args` (its field names; the rest keep their
    defaults). An unknown argument is refused with its name, and each value must have the type
    of its default (an integer is a number too); the Config checks its ranges."""
    config_cls = _method(name).Config
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    typed = {}
    for key, value in (args or {}).items():
        if key not in fields:
            takes = ", ".join(fields) if fields else "no arguments"
            raise SFMPError(f"{where}: method.args.{key}: unknown argument of method {name} "
                            f"(it takes: {takes})")
        default = fields[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise SFMPError(f"{where}: method.args.{key}: expected a {type(default).__name__} "
                            f"(default {default!r}), got {value!r}")
        typed[key] = value
    return config_cls(**typed)


def make_quantizer(name: str, args: Mapping[str, Any] | None = None) -> Quantizer:
    """A fresh quantizer of method `name` with its config (defaults, updated by `args`)."""
    return _method(name)(method_config(name, args))


def check_clip(config: Any, allowed: tuple[str, ...] = CLIPS) -> None:
    """SFMPError unless config.clip is one of `allowed`."""
    if config.clip not in allowed:
        raise SFMPError(f"method.args.clip={config.clip!r}: expected one of "
                        f"{', '.join(allowed)}")


def check_positive(config: Any, *names: str) -> None:
    """SFMPError naming the first of `names` whose value in `config` is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise SFMPError(f"method.args.{name}={value!r}: must be positive")
