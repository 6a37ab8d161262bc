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
class _Entry:
    backend: Backend
    state: Any
    spec: LayerSpec
    # Further input parts of a layer whose inputs are split into ranges that do not line up
    # with the groups (sfmp_serve/tp.py): (start, stop, backend, state) each, outputs summed.
    more: tuple[tuple[int, int, Backend, Any], ...] = ()
    stop: int | None = None  # last input column of the first part when there are more

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + sum(m[3].nbytes for m in self.more)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self.more:
            return self.backend.apply(x, self.state)
        y = self.backend.apply(x[:, :self.stop].contiguous(), self.state)
        for start, stop, backend, state in self.more:
            y = y + backend.apply(x[:, start:stop].contiguous(), state)
        return y


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
    prepared = []
    for part in serving_parts(shard_names, shards, config):
        fused = fuse_shards(name, part.names, part.shards, config, act_dtype, device)
        backend = select_backend(fused.spec)
        prepared.append((part.start, part.stop, backend, backend.prepare(fused), fused.spec))
    first = prepared[0]
    entry = _Entry(first[2], first[3], first[4], tuple(p[:4] for p in prepared[1:]), first[1])
    if name in _LAYERS:
        metrics.add_weight_bytes(-_LAYERS[name].nbytes)
        logger.debug("replacing prepared SFMP layer %s", name)
    _LAYERS[name] = entry
    metrics.add_weight_bytes(entry.nbytes)
    return LayerHandle(name, first[4].out_features, entry.backend.name, entry.nbytes)


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
