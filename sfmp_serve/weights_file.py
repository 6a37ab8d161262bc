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

Files are written here, not by safetensors' save_file: its Rust writer emits the header's
metadata map in a per-process random order (a HashMap), so two writes of the same tensors differ
in bytes. `write_safetensors` writes the same format deterministically: an 8-byte little-endian
header length, the JSON header with sorted keys (`__metadata__` included), padded with spaces to
a multiple of 8, then the tensors back to back, ordered as safetensors orders them (larger
element size first, then by name, so every tensor stays aligned to its element size). A resumed
`sfmp quantize` therefore produces byte-identical shards. `copy_weights` assembles a file from
tensors of other files (a shard from the per-layer parts of a run) chunk by chunk, checking each
tensor against its recorded digest on the way.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping, Sequence

import blake3
import torch
from safetensors import safe_open

from sfmp_serve.errors import FormatError, one_line

ALGORITHM = "blake3"
CHECKSUMS_KEY = "sfmp_checksums"
ALGORITHM_KEY = "sfmp_checksum"

# torch dtype -> the dtype name safetensors writes in its header.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


def _hasher(name: str, dtype: str, shape: Sequence[int]) -> "blake3.blake3":
    """BLAKE3 primed with "name\\ndtype\\nd0,d1,...\\n"; the tensor's bytes follow."""
    return blake3.blake3(f"{name}\n{dtype}\n{','.join(str(d) for d in shape)}\n".encode())


def _raw(tensor: torch.Tensor):
    """The tensor's little-endian bytes as a numpy uint8 view (no copy when contiguous)."""
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return data.view(torch.uint8).numpy()


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """Hex BLAKE3 of "name\\ndtype\\nd0,d1,...\\n" followed by the tensor's bytes."""
    dtype = SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
    hasher = _hasher(name, dtype, tensor.shape)
    if tensor.numel():
        # A uint8 view of the storage: hashed in place, no copy (the GIL is released inside).
        hasher.update(_raw(tensor))
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


# --------------------------------------------------------------------------------------------
# Writing (deterministic bytes)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """One tensor's bytes inside an existing safetensors file."""

    name: str
    dtype: str  # as safetensors spells it
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of its data in `file`
    nbytes: int


def _data_order(entries: Iterable[tuple[str, str]]) -> list[str]:
    """Names in safetensors' data order: larger elements first (so each tensor stays aligned
    to its element size when the data starts 8-aligned), then by name."""
    return [n for n, _ in sorted(entries, key=lambda e: (-DTYPE_SIZES.get(e[1], 1), e[0]))]


def _header(shapes: Mapping[str, tuple[str, Sequence[int], int]], metadata: Mapping[str, str],
            order: Sequence[str]) -> bytes:
    """Length prefix + JSON header (sorted keys, no spaces) padded with spaces to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    start = 0
    for name in order:
        dtype, shape, nbytes = shapes[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start,
                                                                               start + nbytes]}
        start += nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@contextmanager
def _replacing(file: str | os.PathLike, sync: bool) -> Iterator[BinaryIO]:
    """Write beside `file`, then rename over it: the old file may back tensors being written
    (safetensors maps files into memory, and truncating a mapped file kills its reader with
    SIGBUS), and a reader never sees a half-written file."""
    path = Path(file)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_safetensors(file: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str], sync: bool = False) -> None:
    """A safetensors file with a deterministic layout (module docstring); readable by
    safetensors, transformers and vLLM like any other."""
    shapes = {}
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        shapes[name] = (SAFETENSORS_DTYPES[t.dtype], tuple(t.shape),
                        t.numel() * t.element_size())
    order = _data_order((n, s[0]) for n, s in shapes.items())
    with _replacing(file, sync) as f:
        f.write(_header(shapes, metadata, order))
        for name in order:
            if tensors[name].numel():
                f.write(memoryview(_raw(tensors[name])))


def _with_digests(metadata: Mapping[str, str], digests: Mapping[str, str]) -> dict[str, str]:
    return {**metadata, ALGORITHM_KEY: ALGORITHM,
            CHECKSUMS_KEY: json.dumps(dict(digests), sort_keys=True)}


def write_weights(file: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str], sync: bool = False) -> dict[str, str]:
    """One safetensors file holding `tensors`, `metadata` and a checksum of every tensor;
    returns the digests. sync: fsync before returning (a durable part of a resumable run)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    digests = {k: tensor_digest(k, v) for k, v in tensors.items()}
    write_safetensors(file, tensors, _with_digests(metadata, digests), sync)
    return digests


def tensor_refs(file: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """({name: where its bytes are}, recorded digests) of a version 2 file, from its header."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise unreadable(file, e) from e
    metadata = header.pop("__metadata__", None)
    digests = _recorded(file, metadata, required=True)
    base = 8 + length
    refs = {name: TensorRef(name, h["dtype"], tuple(h["shape"]), file,
                            base + h["data_offsets"][0],
                            h["data_offsets"][1] - h["data_offsets"][0])
            for name, h in header.items()}
    return refs, digests


def copy_weights(file: str | os.PathLike, refs: Sequence[TensorRef],
                 digests: Mapping[str, str], metadata: Mapping[str, str], sync: bool = False,
                 chunk: int = 16 << 20) -> None:
    """One safetensors file of the tensors `refs` point at, copied `chunk` bytes at a time
    (memory stays flat whatever the size); each tensor's bytes are hashed on the way and a
    mismatch with `digests` is a FormatError naming the source file."""
    from tqdm.auto import tqdm

    by_name = {r.name: r for r in refs}
    shapes = {r.name: (r.dtype, r.shape, r.nbytes) for r in refs}
    order = _data_order((r.name, r.dtype) for r in refs)
    handles: dict[Path, object] = {}
    total = sum(r.nbytes for r in refs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"write {Path(file).name}",
               leave=False, disable=total < 1 << 28)  # a bar only where it takes seconds
    try:
        with _replacing(file, sync) as out:
            out.write(_header(shapes, _with_digests(metadata, digests), order))
            for name in order:
                ref = by_name[name]
                src = handles.get(ref.file) or handles.setdefault(ref.file, open(ref.file, "rb"))
                src.seek(ref.offset)
                hasher, left = _hasher(name, ref.dtype, ref.shape), ref.nbytes
                while left:
                    data = src.read(min(chunk, left))
                    if not data:
                        raise FormatError(f"{ref.file}: tensor {name}: file truncated")
                    hasher.update(data)
                    out.write(data)
                    left -= len(data)
                    bar.update(len(data))
                if hasher.hexdigest() != digests.get(name):
                    raise FormatError(f"{ref.file}: tensor {name}: checksum mismatch (changed "
                                      "on disk since it was written)")
    finally:
        bar.close()
        for h in handles.values():
            h.close()
