"""Hugging Face-style sharding of a checkpoint's weights: names, the size cap, the index.

A checkpoint whose tensors fit under the cap is one `model.safetensors`; a larger one is
`model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json` mapping every tensor
to its file (the layout `save_pretrained` writes, which transformers and vLLM read). The cap
counts tensor bytes, as transformers' `max_shard_size` does. Shards are filled greedily with
whole units (one decoder layer's tensors, or everything outside the layers), never splitting a
unit: a unit larger than the cap gets a shard of its own. The split depends only on the units'
sizes in order, so a resumed run cuts exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TypeVar

from sfmp_serve.errors import FormatError, SFMPError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # transformers' default "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
K = TypeVar("K")


def parse_size(text: str | int) -> int:
    """Bytes from 5000000, "5GB" (10^9), "500MB", "2GiB" (2^30); SFMPError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise SFMPError(f"--max-shard-size={text!r}: expected a size such as 5GB, 500MB, "
                            "2GiB or a number of bytes")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise SFMPError(f"--max-shard-size={text!r}: must be positive")
    return size


def split_units(units: Sequence[tuple[K, int]], cap: int) -> list[list[K]]:
    """Greedy split of (unit, bytes) pairs, in order, into shards of at most `cap` bytes."""
    shards: list[list[K]] = []
    size = 0
    for unit, nbytes in units:
        if not shards or (shards[-1] and size + nbytes > cap):
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def closes_before(pending_bytes: int, unit_bytes: int, cap: int) -> bool:
    """Does a unit of `unit_bytes` start a new shard after `pending_bytes` (split_units' rule,
    for a writer that sees one unit at a time)?"""
    return pending_bytes > 0 and pending_bytes + unit_bytes > cap


def shard_names(count: int) -> list[str]:
    """The file names of `count` shards, as transformers' save_pretrained names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """model.safetensors.index.json (sorted keys: the same tensors give the same bytes)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_index(directory: str | os.PathLike) -> dict[str, str] | None:
    """weight_map of the directory's index ({tensor: file}), or None without one."""
    index = Path(directory) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{index}: not a valid safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
        raise FormatError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def check_index(directory: Path, files: Iterable[Path], where: Mapping[str, Path]) -> None:
    """The index (if any) names exactly the stored tensors, each in the file holding it, and
    every weights file: transformers and vLLM read only what the index lists."""
    weight_map = read_index(directory)
    if weight_map is None:
        return
    index = directory / INDEX_FILE
    listed = set(weight_map.values())
    for f in files:
        if f.name not in listed:
            raise FormatError(f"{f}: not listed in {index.name} (transformers and vLLM would "
                              "not read it)")
    for key, path in where.items():
        if weight_map.get(key) != path.name:
            raise FormatError(f"{index}: tensor {key}: listed in "
                              f"{weight_map.get(key, 'no file')}, stored in {path.name}")
    missing = sorted(set(weight_map) - set(where))
    if missing:
        raise FormatError(f"{index}: tensor {missing[0]}: listed in {weight_map[missing[0]]}, "
                          "which does not hold it")
