"""The safetensors files of an SFMP checkpoint: tensors plus a checksum of each (version 2).

sfmp_serve.format reads and writes weights only through this module. The checksums live in the
file's own header metadata, so every file (shard) carries the digests of its tensors:

    "sfmp_checksum":  "blake3"
    "sfmp_checksums": JSON object {tensor name: hex digest}

BLAKE3 rather than SHA-256: both are cryptographic hashes, so no accidental corruption (a flipped
bit, a truncated copy, an edited header) goes unnoticed, but BLAKE3 is built for throughput
(SIMD over a Merkle tree): 4-5x the speed of SHA-256 on one core of the 2-core x86 VM this
project is developed on, which has the SHA instructions (4.5 vs 0.83 GB/s under load,
bench/verify_cost.py, docs/integrity.md), and the gap is wider on CPUs without them. It is
already a dependency of vLLM.

The digest covers what a reader relies on, not only the bytes: the tensor's name, its dtype as
safetensors spells it and its shape, then its raw little-endian data. So a header edit that
keeps the byte count (bf16 -> f16, [a, b] -> [b, a], two tensors' names or offsets swapped) is
caught as surely as a flipped byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import blake3
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sfmp_serve.errors import FormatError, one_line

ALGORITHM = "blake3"
CHECKSUMS_KEY = "sfmp_checksums"
ALGORITHM_KEY = "sfmp_checksum"

# torch dtype -> the dtype name safetensors writes in its header.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """Hex BLAKE3 of "name\\ndtype\\nd0,d1,...\\n" followed by the tensor's bytes."""
    dtype = SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
    shape = ",".join(str(d) for d in tensor.shape)
    hasher = blake3.blake3(f"{name}\n{dtype}\n{shape}\n".encode())
    data = tensor.detach().cpu().contiguous().reshape(-1)
    if data.numel():
        # A uint8 view of the storage: hashed in place, no copy (the GIL is released inside).
        hasher.update(data.view(torch.uint8).numpy())
    return hasher.hexdigest()


def unreadable(file: Path, e: Exception) -> FormatError:
    """One line for whatever safetensors (or the OS) raised about a damaged file."""
    return FormatError(f"{file}: cannot read safetensors file ({one_line(e)})")


def read_header(file: Path) -> dict[str, tuple[torch.dtype | str, list[int]]]:
    """{tensor name: (dtype, shape)} from the header alone (no tensor data is read)."""
    inverse = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    try:
        with safe_open(file, framework="pt") as handle:
            out = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                stored = piece.get_dtype()
                out[key] = (inverse.get(stored, stored), list(piece.get_shape()))
            return out
    except Exception as e:  # safetensors raises several types for a damaged file
        raise unreadable(file, e) from e


def _recorded(file: Path, metadata: Mapping[str, str] | None,
              required: bool) -> dict[str, str] | None:
    """The digests stored at export; None when the file has none and none are required."""
    metadata = metadata or {}
    if CHECKSUMS_KEY not in metadata:
        if required:
            raise FormatError(f"{file}: no '{CHECKSUMS_KEY}' in the safetensors header (this "
                              "format version records a checksum of every tensor; was the file "
                              "rewritten by another tool?)")
        return None
    algorithm = metadata.get(ALGORITHM_KEY)
    if algorithm != ALGORITHM:
        raise FormatError(f"{file}: checksum algorithm {algorithm!r} in the header, this "
                          f"sfmp-serve checks '{ALGORITHM}'")
    try:
        digests = json.loads(metadata[CHECKSUMS_KEY])
    except json.JSONDecodeError as e:
        raise FormatError(f"{file}: '{CHECKSUMS_KEY}' in the header is not valid JSON ({e})") \
            from e
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise FormatError(f"{file}: '{CHECKSUMS_KEY}' in the header is not a map of tensor "
                          "names to digests")
    return digests


def read_weights(file: Path, required: bool,
                 verify: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """(every tensor of one safetensors file, whether it records checksums).

    required: the file must record checksums (format version 2); verify: compare every tensor
    with its recorded digest. The set of tensors is always compared with the recorded one.
    """
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(file, framework="pt") as handle:
            digests = _recorded(file, handle.metadata(), required)
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except FormatError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise unreadable(file, e) from e
    if digests is None:
        return tensors, False
    unrecorded = sorted(set(tensors) - set(digests))
    if unrecorded:
        raise FormatError(f"{file}: tensor {unrecorded[0]}: no checksum recorded at export "
                          "(added to the file afterwards?)")
    lost = sorted(set(digests) - set(tensors))
    if lost:
        raise FormatError(f"{file}: tensor {lost[0]}: recorded at export but missing from the "
                          "file")
    if verify:
        for key, tensor in tensors.items():
            if tensor_digest(key, tensor) != digests[key]:
                raise FormatError(f"{file}: tensor {key}: checksum mismatch (its data or its "
                                  "header entry changed after export)")
    return tensors, True


def write_weights(file: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str]) -> None:
    """One safetensors file holding `tensors`, `metadata` and a checksum of every tensor."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    digests = {k: tensor_digest(k, v) for k, v in tensors.items()}
    save_file(tensors, str(file), metadata={
        **metadata, ALGORITHM_KEY: ALGORITHM, CHECKSUMS_KEY: json.dumps(digests, sort_keys=True)})
