"""Tensor-parallel ranges: for `--tp-shards K`, which dimension of each quantized linear is cut
into how many ranges, so that any tensor parallel size dividing K serves the checkpoint.

vLLM gives each rank whole attention heads of q/o (column/row split), whole KV heads of k/v
(replicated when there are fewer KV heads than ranks) and an equal share of the MLP width
(sfmp_serve/arch.py `tensor_parallel`). A linear gets K ranges of its split dimension, a K/V
projection with fewer KV heads than K one per KV head; everything else is refused here, with
the layer and the numbers, before any work is done. The reorder stage then keeps every
permutation inside its ranges and the geometry lays a block grid per range (LayerGeometry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)

AUTO_TP_SHARDS = 8  # the default: one node of 8 GPUs, or any tensor parallel size dividing 8


@dataclass(frozen=True)
class LinearShape:
    local: str  # name relative to the decoder layer, as stored
    out_features: int
    in_features: int


@dataclass(frozen=True)
class TPPlan:
    shards: int
    ranges: dict[str, tuple[str, int]]  # relative linear name -> (dim, number of ranges)


def _units(unit: str, dim: str, hf_config: Mapping[str, Any], width: int) -> tuple[int, str]:
    """How many of what a rank must get whole: heads, KV heads, or rows / inputs."""
    heads = int(hf_config.get("num_attention_heads") or 0)
    if unit == "heads":
        return heads, "attention heads"
    if unit == "kv_heads":
        return int(hf_config.get("num_key_value_heads") or heads), "KV heads"
    return width, "rows" if dim == "out" else "inputs"


def ranges_for(shards: int, spec: ArchSpec, hf_config: Mapping[str, Any],
               linears: Iterable[LinearShape],
               whole_heads: bool = True) -> dict[str, tuple[str, int]]:
    """Ranges of every linear for `shards`; SFMPError naming the first linear that cannot be
    split so. whole_heads=False cuts attention by width alone: only for measuring what the
    ranges cost on a model whose heads K does not divide (vLLM cannot serve that at TP K)."""
    out: dict[str, tuple[str, int]] = {}
    if shards == 1:
        return out
    for linear in linears:
        if linear.local in out:
            continue
        how = spec.tensor_parallel.get(linear.local)
        if how is None:
            if spec.moe is not None and spec.moe.expert_of(linear.local) is not None:
                continue  # routed experts stay whole: MoE layers are served on one rank
            raise SFMPError(f"--tp-shards {shards}: layer {linear.local} of a {spec.family} "
                            "model has no tensor-parallel split (vLLM loads it whole per "
                            "rank or fused); use --tp-shards 1")
        dim, unit = how
        unit = unit if whole_heads else "width"
        width = linear.out_features if dim == "out" else linear.in_features
        count, what = _units(unit, dim, hf_config, width)
        if count % shards == 0 and width % shards == 0:
            out[linear.local] = (dim, shards)
        elif unit == "kv_heads" and count and shards % count == 0:
            out[linear.local] = (dim, count)  # one range per KV head, replicated by vLLM
        else:
            raise SFMPError(f"--tp-shards {shards}: layer {linear.local} has {count} {what}, "
                            f"which cannot be split into {shards} equal tensor-parallel ranges")
    return out


def plan_tp(requested: int | None, spec: ArchSpec, hf_config: Mapping[str, Any],
            linears: Iterable[LinearShape], whole_heads: bool = True) -> TPPlan:
    """`requested` shards (an error when the model cannot take them), or with None the largest
    number up to AUTO_TP_SHARDS that it can (8 for the usual models)."""
    linears = list(linears)
    if requested is not None:
        if requested < 1:
            raise SFMPError(f"--tp-shards={requested}: must be a positive integer")
        return TPPlan(requested, ranges_for(requested, spec, hf_config, linears, whole_heads))
    why = ""
    for shards in range(AUTO_TP_SHARDS, 0, -1):
        try:
            plan = TPPlan(shards, ranges_for(shards, spec, hf_config, linears))
        except SFMPError as e:
            why = why or str(e)
            continue
        if why:
            log.info("%s; tp_shards %d instead (serves at tensor parallel sizes dividing it)",
                     why, shards)
        return plan
    raise AssertionError("one shard always fits")
