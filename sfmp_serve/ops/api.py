"""The SFMP op API: one torch custom op, a backend registry, and a registry of prepared layers.

Contract for backends (on the CPU the compiled kernels in ops/cpu_native/ and the plain-torch
fallback in ops/cpu_torch.py; on NVIDIA GPUs ops/cuda/; each registers itself with
`register_backend` when its module is imported):

    class Backend(Protocol):
        name: str
        device_type: str                                   # "cpu", "cuda", ...
        def can_implement(self, spec: LayerSpec) -> tuple[bool, str]   # (ok, why not)
        def prepare(self, layer: FusedLayer) -> PreparedLayer         # ONCE, at load
        def apply(self, x: Tensor, state: PreparedLayer) -> Tensor    # every call

`prepare` receives the validated shards of one vLLM layer plus the composed permutations
(ops/runtime.py) and returns any object with an `nbytes` attribute (resident bytes of what it
keeps). `apply` gets x [M, in_features] (original input order, activation dtype, on the
layer's device) and returns y [M, out_features] in the fused original output order, without
bias, in x's dtype. The CUDA backend must make `apply` capture-safe (no host syncs) if vLLM is
to record it in CUDA graphs.

The op `torch.ops.sfmp.linear(x, layer, out_features)` names the layer by a string, like
vLLM's attention op does, so torch.compile sees one opaque call with a fake (meta)
implementation and never traces into the backend. Dispatch by device and batch size happens
inside the op, at run time: a branch in vLLM's `apply()` would be frozen at trace time.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sfmp_serve import metrics
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import PackedLinear, SFMPConfig
from sfmp_serve.ops.runtime import FusedLayer, LayerSpec, fuse_shards
from sfmp_serve.tp import serving_parts

logger = logging.getLogger(__name__)

# Calls with at most this many rows (tokens) count as decode; larger ones as prefill.
DECODE_MAX_M = 16
# Modules imported on first use of a device type, so their backends register themselves.
_BUILTIN_BACKEND_MODULES = {"cpu": ("sfmp_serve.ops.cpu_native", "sfmp_serve.ops.cpu_torch"),
                            "cuda": ("sfmp_serve.ops.cuda",)}


class PreparedLayer(Protocol):
    nbytes: int


class Backend(Protocol):
    name: str
    device_type: str

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]: ...

    def prepare(self, layer: FusedLayer) -> PreparedLayer: ...

    def apply(self, x: torch.Tensor, state: Any) -> torch.Tensor: ...


@dataclass
class LayerHandle:
    """What a caller keeps for a prepared layer: call `linear(x, handle)`."""

    name: str
    out_features: int
    backend: str
    nbytes: int


@dataclass
class PreparedPart:
    """One input part of a layer (sfmp_serve/tp.py InputPart) with its backend state."""

    start: int
    stop: int
    gather: torch.Tensor | None  # on the layer's device
    backend: Backend
    state: Any
    spec: LayerSpec

    def apply(self, x: torch.Tensor, whole: bool) -> torch.Tensor:
        """This part's output for the layer input x [M, in_features]."""
        if self.gather is not None:  # widened input ranges: their padding reads a zero column
            x = torch.nn.functional.pad(x, (0, 1))[:, self.gather]
        elif not whole:
            x = x[:, self.start:self.stop].contiguous()
        return self.backend.apply(x, self.state)


def prepare_parts(name: str, shard_names: tuple[str, ...], shards: tuple[PackedLinear, ...],
                  config: SFMPConfig, act_dtype: torch.dtype,
                  device: torch.device | str) -> list[PreparedPart]:
    """Backend states of a layer's input parts (one, unless its inputs are cut into ranges
    that run separately: sfmp_serve/tp.py); raises SFMPError when no backend applies."""
    prepared = []
    for part in serving_parts(shard_names, shards, config):
        fused = fuse_shards(name, part.names, part.shards, config, act_dtype, device)
        backend = select_backend(fused.spec)
        gather = None if part.gather is None else part.gather.to(device)
        prepared.append(PreparedPart(part.start, part.stop, gather, backend,
                                     backend.prepare(fused), fused.spec))
    return prepared


def apply_parts(x: torch.Tensor, parts: list[PreparedPart]) -> torch.Tensor:
    """y = x @ W^T of a layer from its prepared input parts (their outputs summed)."""
    y = parts[0].apply(x, len(parts) == 1)
    for part in parts[1:]:
        y = y + part.apply(x, False)
    return y


@dataclass
class _Entry:
    parts: list[PreparedPart]

    @property
    def spec(self) -> LayerSpec:
        return self.parts[0].spec

    @property
    def backend(self) -> Backend:
        return self.parts[0].backend

    @property
    def nbytes(self) -> int:
        return sum(p.state.nbytes for p in self.parts)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return apply_parts(x, self.parts)


_BACKENDS: dict[str, list[tuple[int, Backend]]] = {}
_IMPORT_ERRORS: dict[str, str] = {}  # device type -> why its built-in backend module failed
_IMPORTED: set[str] = set()  # built-in backend modules already imported (or tried)
_LAYERS: dict[str, _Entry] = {}


def register_backend(backend: Backend, priority: int = 0) -> None:
    """Add a backend for `backend.device_type`; higher priority is tried first. Idempotent."""
    entries = _BACKENDS.setdefault(backend.device_type, [])
    entries[:] = [(p, b) for p, b in entries if b.name != backend.name]
    entries.append((priority, backend))
    entries.sort(key=lambda e: -e[0])


def backends_for(device_type: str) -> list[Backend]:
    for module in _BUILTIN_BACKEND_MODULES.get(device_type, ()):
        if module in _IMPORTED:
            continue
        _IMPORTED.add(module)
        try:
            importlib.import_module(module)
        except ImportError as e:  # not in this build, or a dependency (e.g. cupy) is missing
            _IMPORT_ERRORS[device_type] = f"cannot import {module} ({e})"
            logger.debug("SFMP backend module %s unavailable: %s", module, e)
    return [b for _, b in _BACKENDS.get(device_type, [])]


def select_backend(spec: LayerSpec) -> Backend:
    """The first backend that can implement `spec`; else an error with every reason."""
    candidates = backends_for(spec.device_type)  # imports the built-in module on first use
    reasons = [_IMPORT_ERRORS[spec.device_type]] if spec.device_type in _IMPORT_ERRORS else []
    for backend in candidates:
        ok, why = backend.can_implement(spec)
        if ok:
            return backend
        reasons.append(f"{backend.name}: {why}")
    detail = "; ".join(reasons) if reasons else "no backend is installed for this device"
    raise SFMPError(f"layer {spec.name}: no SFMP backend for device '{spec.device_type}' "
                    f"({detail})")


def prepare_layer(name: str, shard_names: tuple[str, ...], shards: tuple[PackedLinear, ...],
                  config: SFMPConfig, act_dtype: torch.dtype,
                  device: torch.device | str) -> LayerHandle:
    """Build the runtime state of one layer once, and register it under `name` for the op.

    Shards may carry tensor-parallel ranges (a version 4 checkpoint, or one rank's share of
    it): they are cut into plain linears first (sfmp_serve/tp.py)."""
    entry = _Entry(prepare_parts(name, shard_names, shards, config, act_dtype, device))
    if name in _LAYERS:
        metrics.add_weight_bytes(-_LAYERS[name].nbytes)
        logger.debug("replacing prepared SFMP layer %s", name)
    _LAYERS[name] = entry
    metrics.add_weight_bytes(entry.nbytes)
    return LayerHandle(name, entry.spec.out_features, entry.backend.name, entry.nbytes)


def release_layer(name: str) -> None:
    entry = _LAYERS.pop(name, None)
    if entry is not None:
        metrics.add_weight_bytes(-entry.nbytes)


def prepared_layers() -> dict[str, LayerSpec]:
    return {name: entry.spec for name, entry in _LAYERS.items()}


@torch.library.custom_op("sfmp::linear", mutates_args=())
def _sfmp_linear(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    entry = _LAYERS.get(layer)
    if entry is None:
        raise SFMPError(f"layer {layer}: not prepared in this process (prepare_layer first)")
    if x.device.type != entry.spec.device_type:
        raise SFMPError(f"layer {layer}: input on {x.device.type}, weights prepared for "
                        f"{entry.spec.device_type}")
    x2 = x.reshape(-1, x.shape[-1])
    path = "decode" if x2.shape[0] <= DECODE_MAX_M else "prefill"
    start = time.perf_counter()
    y = entry.apply(x2)
    # On asynchronous devices this is launch time, not kernel time.
    metrics.observe_op(path, time.perf_counter() - start)
    return y.reshape(*x.shape[:-1], out_features)


@_sfmp_linear.register_fake
def _sfmp_linear_fake(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def linear(x: torch.Tensor, handle: LayerHandle,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a prepared layer; x [..., in_features] in original order."""
    y = torch.ops.sfmp.linear(x, handle.name, handle.out_features)
    return y if bias is None else y + bias
