"""The SFMP checkpoint format, version 4: the one module that reads, writes and validates it.

docs/format.md is the specification in prose; this module is the same specification in code.
Offline code writes a checkpoint held in memory through `write_checkpoint`, and one written
layer by layer (offline/writer.py) through the same pieces: `checkpoint_config`,
`write_config`, the weights files of sfmp_serve/weights_file.py and the shards of
sfmp_serve/shards.py. Serving code reads them only through `load_checkpoint` /
`PackedLinear.from_tensors`, and every tensor is validated here.
Version 2 adds a checksum of every tensor (sfmp_serve/weights_file.py); version 1 checkpoints
are still read, with a warning that corruption cannot be detected in them. Version 3 stores each
permutation in the narrowest unsigned type that holds it (16 bits up to 65,536 entries): on a
135M model the two int32 permutations of every linear were 0.092 bits per weight; older
checkpoints (int32 permutations) are read as they are. Version 4 records `tp_shards` and each
linear's tensor-parallel ranges (`tp_ranges`, LayerGeometry): permutations and block grid stay
inside ranges that vLLM's tensor-parallel ranks can load alone (sfmp_serve/tp.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from sfmp_serve.atomic_dir import atomic_directory
from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.shards import (DEFAULT_MAX_SHARD_SIZE, SINGLE_FILE, check_index, shard_names,
                               split_units, write_index)
from sfmp_serve.weights_file import read_weights, write_weights

log = logging.getLogger(__name__)

QUANT_METHOD = "sfmp"
FORMAT_VERSION = 4  # what write_checkpoint writes
# 3: no tensor-parallel ranges; 2: int32 permutations too; 1: the same, without checksums
READABLE_VERSIONS = (1, 2, 3, 4)
TP_RANGES_SINCE = 4  # the format version that records tp_shards / tp_ranges
SPLIT_DIMS = ("out", "in")  # a linear's ranges split its outputs (rows) or its inputs (columns)
WORD_BITS = 32
MAX_BITS = 8
ACT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Per-linear tensors, in the order docs/format.md lists them.
TENSOR_SUFFIXES = ("qweight", "alpha", "beta", "block_bits", "block_offsets", "input_perm",
                   "output_perm")
WEIGHTS_FILE = SINGLE_FILE  # the weights of an unsharded checkpoint (sfmp_serve/shards.py)
# Header metadata of every weights file (weights_file.py adds the checksums).
WEIGHTS_METADATA = {"format": "pt", "sfmp_format_version": str(FORMAT_VERSION)}
# config.json key and value that make plain transformers refuse the checkpoint: without
# `import sfmp_serve.hf` it would ignore the unknown quant_method and run the model with random
# linears. transformers raises a ValueError quoting any `transformers_weights` that names no
# safetensors file, before it reads a weight; the registered quantizer removes the key first
# (hf/hf_quantizer.py), and vLLM never reads it. Not a format change: readers ignore it.
TRANSFORMERS_GUARD_KEY = "transformers_weights"
TRANSFORMERS_GUARD = ("this is an SFMP checkpoint: `import sfmp_serve.hf` before "
                      "from_pretrained to load it (pip install sfmp-serve); for lm-eval use "
                      "`sfmp eval lm-eval`")
# avg_bits / bits_per_weight are written rounded to 6 decimals; a larger difference from what
# the tensors give means the config was edited (or belongs to other tensors).
BITS_TOLERANCE = 2e-6


# --------------------------------------------------------------------------------------------
# quantization_config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFMPConfig:
    """`quantization_config` of an SFMP checkpoint (config.json). Unknown keys are rejected."""

    group_size: int
    block_rows: int
    bit_choices: tuple[int, ...]
    avg_bits: float  # achieved average code bits, weighted by weights (not blocks)
    bits_per_weight: float  # all storage of the quantized linears / their number of weights
    act_dtype: str
    quantized_modules: tuple[str, ...]  # full names of the linears stored in SFMP form
    input_groups: tuple[tuple[str, ...], ...]  # relative linear names sharing one input order
    target_bits: float | None = None
    method: str = "rtn"
    method_args: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    # Tensor-parallel readiness (version 4): the checkpoint serves at any tensor parallel size
    # dividing tp_shards. tp_ranges: linear name relative to its decoder layer -> [dim, n]: its
    # permutations and block grid stay inside n equal contiguous ranges of that dimension
    # ("out": rows, "in": columns). Linears not listed are one range.
    tp_shards: int = 1
    tp_ranges: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, want: str) -> FormatError:
            return FormatError(f"quantization_config.{key}={value!r}: {want}")

        if self.quant_method != QUANT_METHOD:
            raise bad("quant_method", self.quant_method, f"expected '{QUANT_METHOD}'")
        if self.format_version not in READABLE_VERSIONS:
            raise bad("format_version", self.format_version,
                      f"unknown format version (this sfmp-serve reads "
                      f"{', '.join(map(str, READABLE_VERSIONS))})")
        for key in ("group_size", "block_rows"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise bad(key, value, "must be a positive integer")
        if self.group_size % 8:
            raise bad("group_size", self.group_size, "must be a multiple of 8")
        if not self.bit_choices or any(not 1 <= b <= MAX_BITS for b in self.bit_choices):
            raise bad("bit_choices", self.bit_choices, f"each must be in 1..{MAX_BITS}")
        if self.act_dtype not in ACT_DTYPES:
            raise bad("act_dtype", self.act_dtype, f"expected one of {sorted(ACT_DTYPES)}")
        twice = sorted({m for m in self.quantized_modules if self.quantized_modules.count(m) > 1})
        if twice:
            raise bad("quantized_modules", twice[0], "listed more than once")
        if not isinstance(self.tp_shards, int) or self.tp_shards <= 0:
            raise bad("tp_shards", self.tp_shards, "must be a positive integer")
        if self.format_version < TP_RANGES_SINCE and (self.tp_shards != 1 or self.tp_ranges):
            raise bad("tp_shards", self.tp_shards,
                      f"needs format version {TP_RANGES_SINCE} (this is {self.format_version})")
        for linear, (dim, n) in self.tp_ranges.items():
            if dim not in SPLIT_DIMS or not isinstance(n, int) or n < 1 or self.tp_shards % n:
                raise bad(f"tp_ranges.{linear}", [dim, n],
                          f"expected [\"out\" or \"in\", a divisor of tp_shards "
                          f"{self.tp_shards}]")

    def split_of(self, name: str) -> tuple[str, int] | None:
        """(dim, ranges) of the stored linear `name`; None when it has no tensor-parallel
        split (one range, whole on every rank)."""
        return self.tp_ranges.get(relative_name(name))

    def ranges_of(self, name: str) -> tuple[int, int]:
        """(row ranges, column ranges) of the stored linear `name` (full or relative name)."""
        return linear_ranges(self.tp_ranges, name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SFMPConfig":
        if not isinstance(data, Mapping):
            raise FormatError(f"quantization_config: expected a JSON object, got "
                              f"{type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FormatError(f"quantization_config: unknown key(s) {unknown}")
        missing = sorted(k for k in ("group_size", "block_rows", "bit_choices", "avg_bits",
                                     "bits_per_weight", "act_dtype", "quantized_modules",
                                     "input_groups") if k not in data)
        if missing:
            raise FormatError(f"quantization_config: missing key(s) {missing}")
        for key, value in data.items():
            check, want = _SCHEMA[key]
            if not check(value):
                raise FormatError(f"quantization_config.{key}={value!r}: must be {want}")
        values = dict(data)
        values["bit_choices"] = tuple(int(b) for b in values["bit_choices"])
        values["quantized_modules"] = tuple(values["quantized_modules"])
        values["input_groups"] = tuple(tuple(g) for g in values["input_groups"])
        if "tp_ranges" in values:
            values["tp_ranges"] = {k: tuple(v) for k, v in values["tp_ranges"].items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bit_choices"] = list(self.bit_choices)
        data["quantized_modules"] = list(self.quantized_modules)
        data["input_groups"] = [list(g) for g in self.input_groups]
        data["tp_ranges"] = {k: list(v) for k, v in sorted(self.tp_ranges.items())}
        if self.format_version < TP_RANGES_SINCE:  # not keys of older versions
            del data["tp_shards"], data["tp_ranges"]
        return data

    @property
    def torch_act_dtype(self) -> torch.dtype:
        return ACT_DTYPES[self.act_dtype]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(v: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(v, (list, tuple)) and all(item(x) for x in v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


# JSON type of every quantization_config key: a wrong one is named instead of surfacing later
# as a TypeError (or, for a string where a list belongs, as a list of its characters).
_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "quant_method": (_is_str, "a string"),
    "format_version": (_is_int, "an integer"),
    "group_size": (_is_int, "an integer"),
    "block_rows": (_is_int, "an integer"),
    "bit_choices": (lambda v: _is_list(v, _is_int), "a list of integers"),
    "target_bits": (lambda v: v is None or _is_number(v), "a number or null"),
    "avg_bits": (_is_number, "a number"),
    "bits_per_weight": (_is_number, "a number"),
    "act_dtype": (_is_str, "a string"),
    "quantized_modules": (lambda v: _is_list(v, _is_str), "a list of module names"),
    "input_groups": (lambda v: _is_list(v, lambda g: _is_list(g, _is_str)),
                     "a list of lists of module names"),
    "method": (_is_str, "a string"),
    "method_args": (lambda v: isinstance(v, Mapping), "a JSON object"),
    "calibration": (lambda v: isinstance(v, Mapping), "a JSON object"),
    "tp_shards": (_is_int, "an integer"),
    "tp_ranges": (lambda v: isinstance(v, Mapping) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and _is_str(r[0]) and _is_int(r[1])
        for r in v.values()), 'a JSON object of [\"out\" or \"in\", integer] pairs'),
}


_LAYER_INDEX = re.compile(r"^(?:.*?\.)?\d+\.(.+)$")


def linear_ranges(tp_ranges: Mapping[str, tuple[str, int]], name: str) -> tuple[int, int]:
    """(row ranges, column ranges) of linear `name` under `tp_ranges` (SFMPConfig's)."""
    dim, n = tp_ranges.get(relative_name(name), ("out", 1))
    return (n, 1) if dim == "out" else (1, n)


def relative_name(name: str) -> str:
    """A linear's name relative to its decoder layer (`model.layers.3.mlp.down_proj` ->
    `mlp.down_proj`); a name without a layer index is returned as it is."""
    match = _LAYER_INDEX.match(name)
    return match.group(1) if match else name


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN/Inf in `tensor`, checked in chunks: isfinite of a whole embedding would allocate
    a byte per element at once."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all())
               for i in range(0, flat.numel(), chunk))


NARROW_PERMS_SINCE = 3  # the format version that stores permutations in 16 bits


def perm_dtype(length: int, version: int = FORMAT_VERSION) -> torch.dtype:
    """The type format `version` stores a permutation of `length` entries in: the narrowest
    that holds it from version 3 on, int32 before."""
    return torch.uint16 if version >= NARROW_PERMS_SINCE and length <= 1 << 16 else torch.int32


# --------------------------------------------------------------------------------------------
# Geometry: blocks, ragged edges and word offsets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerGeometry:
    """Block grid of one reordered [out_features, in_features] matrix.

    Padding rule: edge blocks are ragged. The last block-row holds the remaining rows, the last
    group the remaining inputs; inside a group, each plane row is padded to whole 32-bit words
    with zero bits, which multiply zero-padded activations and so never contribute.

    Tensor-parallel ranges (format version 4): the matrix is `row_ranges` x `col_ranges` equal
    parts, and each part has its own grid with its own ragged edges, so no block crosses a part
    boundary and a part is a complete linear by itself (sfmp_serve/tp.py cuts them out). Parts
    are stored part after part (row-major over parts), each in row-major block order, so a
    part's words are contiguous; with one part this is the plain row-major block order.
    """

    out_features: int
    in_features: int
    group_size: int
    block_rows: int
    row_ranges: int = 1
    col_ranges: int = 1

    def __post_init__(self) -> None:
        for dim, size, n in (("outputs", self.out_features, self.row_ranges),
                             ("inputs", self.in_features, self.col_ranges)):
            if n < 1 or size % n:
                raise FormatError(f"{size} {dim} cannot be cut into {n} equal ranges")

    @property
    def part_rows(self) -> int:
        return self.out_features // self.row_ranges

    @property
    def part_cols(self) -> int:
        return self.in_features // self.col_ranges

    @property
    def part_block_rows(self) -> int:
        return math.ceil(self.part_rows / self.block_rows)

    @property
    def part_groups(self) -> int:
        return math.ceil(self.part_cols / self.group_size)

    @property
    def n_block_rows(self) -> int:
        return self.row_ranges * self.part_block_rows

    @property
    def n_groups(self) -> int:
        return self.col_ranges * self.part_groups

    @property
    def n_parts(self) -> int:
        return self.row_ranges * self.col_ranges

    def part(self) -> "LayerGeometry":
        """The grid of one part (all parts have the same)."""
        return LayerGeometry(self.part_rows, self.part_cols, self.group_size, self.block_rows)

    @staticmethod
    def _tiles(size: int, tile: int, repeat: int) -> torch.Tensor:
        count = math.ceil(size / tile)
        t = torch.full((count,), tile, dtype=torch.int64)
        t[-1] = size - tile * (count - 1)
        return t.repeat(repeat)

    def rows(self) -> torch.Tensor:
        """Rows in each block-row, [n_block_rows]."""
        return self._tiles(self.part_rows, self.block_rows, self.row_ranges)

    def cols(self) -> torch.Tensor:
        """Inputs in each group, [n_groups]."""
        return self._tiles(self.part_cols, self.group_size, self.col_ranges)

    def row_block_index(self) -> torch.Tensor:
        """Block-row of every row, int64 [out_features]."""
        return torch.arange(self.n_block_rows).repeat_interleave(self.rows())

    def col_group_index(self) -> torch.Tensor:
        """Group of every input, int64 [in_features]."""
        return torch.arange(self.n_groups).repeat_interleave(self.cols())

    def words(self) -> torch.Tensor:
        """32-bit words per plane row in each group, [n_groups]."""
        return (self.cols() + WORD_BITS - 1) // WORD_BITS

    def block_words(self, block_bits: torch.Tensor) -> torch.Tensor:
        """Words each block occupies, [n_block_rows, n_groups] int64."""
        return block_bits.to(torch.int64) * self.rows()[:, None] * self.words()[None, :]

    def block_order(self) -> torch.Tensor:
        """Flat (row-major) block indices in storage order: part after part, each row-major."""
        grid = torch.arange(self.n_block_rows * self.n_groups).view(
            self.row_ranges, self.part_block_rows, self.col_ranges, self.part_groups)
        return grid.permute(0, 2, 1, 3).flatten()

    def offsets(self, block_bits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Word offset of every block (storage order) and the total number of words."""
        order = self.block_order()
        sizes = self.block_words(block_bits).flatten()[order]
        ends = torch.cumsum(sizes, 0)
        total = int(ends[-1]) if ends.numel() else 0
        starts = torch.empty_like(ends)
        starts[order] = ends - sizes
        return starts.view(self.n_block_rows, self.n_groups), total


# --------------------------------------------------------------------------------------------
# One packed linear
# --------------------------------------------------------------------------------------------
@dataclass
class PackedLinear:
    """The SFMP tensors of one linear (the canonical, device-independent layout).

    qweight: int32 [total_words], blocks in row-major block order; block (r, g) with b bits is
        [b planes][words of group g][rows of block-row r], bit j of a word = input 32*w + j of
        the group, 1 -> +1 and 0 -> -1.
    alpha, beta: [out_features, n_groups] in the activation dtype, rows in reordered order:
        W_reordered[row, col] = sum_i alpha * 2^i * s_i + beta.
    block_bits: uint8 [n_block_rows, n_groups]; block_offsets: int32, same shape (word offsets).
    input_perm: int32 [in_features]; reordered input j is original input input_perm[j].
    output_perm: int32 [out_features]; reordered output i is original output output_perm[i].
    Permutations are int32 in memory whatever they were stored as (perm_dtype: uint16 up to
    65,536 entries from version 3 on); `to_tensors` gives them in the stored type.
    """

    qweight: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    block_bits: torch.Tensor
    block_offsets: torch.Tensor
    input_perm: torch.Tensor
    output_perm: torch.Tensor
    bias: torch.Tensor | None = None
    # (row ranges, column ranges): tensor-parallel parts (LayerGeometry); not a tensor, the
    # config's tp_ranges says it (SFMPConfig.ranges_of)
    ranges: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        # One in-memory type for every version and every loader (vLLM's, transformers'):
        # torch does little arithmetic on uint16, so a narrow stored permutation is widened.
        for name in ("input_perm", "output_perm"):
            perm = getattr(self, name)
            if perm.dtype == torch.uint16:
                setattr(self, name, perm.to(torch.int32))

    @property
    def out_features(self) -> int:
        return self.output_perm.numel()

    @property
    def in_features(self) -> int:
        return self.input_perm.numel()

    def geometry(self, config: SFMPConfig) -> LayerGeometry:
        return LayerGeometry(self.out_features, self.in_features, config.group_size,
                             config.block_rows, *self.ranges)

    def to_tensors(self, prefix: str, version: int = FORMAT_VERSION) -> dict[str, torch.Tensor]:
        """The tensors as format `version` stores them."""
        out = {f"{prefix}.{s}": getattr(self, s).contiguous() for s in TENSOR_SUFFIXES}
        for s in ("input_perm", "output_perm"):
            perm = out[f"{prefix}.{s}"]
            out[f"{prefix}.{s}"] = perm.to(perm_dtype(perm.numel(), version))
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.contiguous()
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, torch.Tensor],
                     ranges: tuple[int, int] = (1, 1)) -> "PackedLinear":
        missing = [s for s in TENSOR_SUFFIXES if f"{prefix}.{s}" not in tensors]
        if missing:
            raise FormatError(f"layer {prefix}: missing tensor(s) "
                              f"{', '.join(f'{prefix}.{s}' for s in missing)}")
        return cls(**{s: tensors[f"{prefix}.{s}"] for s in TENSOR_SUFFIXES},
                   bias=tensors.get(f"{prefix}.bias"), ranges=ranges)

    def stored_bits(self, version: int = FORMAT_VERSION) -> int:
        """Bits this linear occupies on disk in format `version` (bias excluded: it is not part
        of the weight)."""
        return 8 * sum(t.numel() * t.element_size() for t in self.to_tensors("", version).values())

    def code_bits(self, config: SFMPConfig) -> int:
        """Sum over blocks of bit-width x weights in the block (ragged edges at true size)."""
        geo = self.geometry(config)
        sizes = geo.rows()[:, None] * geo.cols()[None, :]
        return int((self.block_bits.to("cpu", torch.int64) * sizes).sum())

    def validate(self, name: str, config: SFMPConfig,
                 shape: tuple[int, int] | None = None) -> None:
        """Check every tensor against the config; raise FormatError naming layer and tensor."""
        def fail(tensor: str, why: str) -> FormatError:
            return FormatError(f"layer {name}: tensor {name}.{tensor}: {why}")

        def expect(tensor: str, dtype: torch.dtype, dims: tuple[int, ...]) -> torch.Tensor:
            t = getattr(self, tensor)
            if t.dtype != dtype:
                raise fail(tensor, f"dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != dims:
                raise fail(tensor, f"shape {tuple(t.shape)}, expected {dims}")
            return t

        n, k = self.out_features, self.in_features
        if self.output_perm.dim() != 1 or self.input_perm.dim() != 1 or n == 0 or k == 0:
            raise fail("input_perm", "permutations must be non-empty 1-D tensors")
        if shape is not None and (n, k) != tuple(shape):
            raise fail("output_perm", f"layer is [{n}, {k}] in the checkpoint but "
                                      f"[{shape[0]}, {shape[1]}] in the model")
        try:
            geo = self.geometry(config)
        except FormatError as e:
            raise FormatError(f"layer {name}: tensor-parallel ranges {list(self.ranges)}: "
                              f"{e}") from None
        for perm, length, n_ranges in (("input_perm", k, geo.col_ranges),
                                       ("output_perm", n, geo.row_ranges)):
            p = expect(perm, torch.int32, (length,))
            if not torch.equal(torch.sort(p.to(torch.int64)).values, torch.arange(length)):
                raise fail(perm, f"not a permutation of 0..{length - 1}")
            if n_ranges > 1:  # every range's entries stay inside the range
                size = length // n_ranges
                home = torch.arange(length) // size
                stray = (p.to(torch.int64) // size != home).nonzero()
                if stray.numel():
                    i = int(stray[0])
                    raise fail(perm, f"entry {i} = {int(p[i])} leaves its tensor-parallel range "
                                     f"{int(home[i])} of {n_ranges} ({size} each)")
        expect("alpha", config.torch_act_dtype, (n, geo.n_groups))
        expect("beta", config.torch_act_dtype, (n, geo.n_groups))
        for t in ("alpha", "beta"):
            if not all_finite(getattr(self, t)):
                raise fail(t, "contains NaN or Inf")
        bits = expect("block_bits", torch.uint8, (geo.n_block_rows, geo.n_groups))
        bad_bits = sorted(set(bits.unique().tolist()) - set(config.bit_choices))
        if bad_bits:
            raise fail("block_bits", f"bit-width(s) {bad_bits} not in bit_choices "
                                     f"{list(config.bit_choices)}")
        offsets, total = geo.offsets(bits)
        stored = expect("block_offsets", torch.int32, (geo.n_block_rows, geo.n_groups))
        if not torch.equal(stored.to(torch.int64), offsets):
            raise fail("block_offsets", "inconsistent with block_bits and the layer shape")
        q = self.qweight
        if q.dtype != torch.int32 or q.dim() != 1:
            raise fail("qweight", f"expected a 1-D int32 tensor, got {q.dtype} {tuple(q.shape)}")
        if q.numel() != total:
            raise fail("qweight", f"{q.numel()} words, but block_bits and the shape "
                                  f"[{n}, {k}] need {total}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise fail("bias", f"shape {tuple(self.bias.shape)}, expected ({n},)")
        if self.bias is not None and not all_finite(self.bias):
            raise fail("bias", "contains NaN or Inf")


@dataclass(frozen=True)
class BitStats:
    """avg_bits and bits_per_weight as the tensors give them (never taken from the config)."""

    weights: int
    code_bits: int
    stored_bits: int

    @property
    def avg_bits(self) -> float:
        return self.code_bits / self.weights if self.weights else 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights if self.weights else 0.0

    @classmethod
    def of(cls, packed: Iterable[PackedLinear], config: SFMPConfig) -> "BitStats":
        layers = list(packed)
        return cls(sum(p.out_features * p.in_features for p in layers),
                   sum(p.code_bits(config) for p in layers),
                   sum(p.stored_bits(config.format_version) for p in layers))


# --------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """An SFMP checkpoint on disk: HF config, SFMP config, and its tensors."""

    path: Path
    hf_config: dict[str, Any]
    config: SFMPConfig
    tensors: dict[str, torch.Tensor]
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> file holding it

    def packed(self, name: str) -> PackedLinear:
        return PackedLinear.from_tensors(name, self.tensors, self.config.ranges_of(name))

    def bit_stats(self) -> BitStats:
        return BitStats.of((self.packed(n) for n in self.config.quantized_modules), self.config)

    def where(self, key: str) -> str:
        """`file: tensor key` for error messages."""
        return f"{self.files.get(key, self.path)}: tensor {key}"

    def validate(self, shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Validate every quantized linear (optionally against the model's [out, in] shapes),
        every other tensor's values, and the bit statistics the config states."""
        for name in self.config.quantized_modules:
            self.packed(name).validate(name, self.config, (shapes or {}).get(name))
            for perm in ("input_perm", "output_perm"):  # as stored, before widening
                stored = self.tensors[f"{name}.{perm}"]
                want = perm_dtype(stored.numel(), self.config.format_version)
                if stored.dtype != want:
                    raise FormatError(f"{self.where(f'{name}.{perm}')}: dtype {stored.dtype}, "
                                      f"format version {self.config.format_version} stores "
                                      f"it as {want}")
        listed = set(self.config.quantized_modules)
        orphans = sorted(k for k in self.tensors
                         if k.endswith(".qweight") and k[: -len(".qweight")] not in listed)
        if orphans:
            raise FormatError(f"tensor {orphans[0]}: belongs to no layer listed in "
                              "quantization_config.quantized_modules")
        for key, tensor in self.tensors.items():
            owner, _, suffix = key.rpartition(".")
            if owner in listed and suffix in TENSOR_SUFFIXES:
                continue  # alpha/beta checked by PackedLinear.validate; the rest is integer
            if tensor.is_floating_point() and not all_finite(tensor):
                raise FormatError(f"{self.where(key)}: contains NaN or Inf")
        stats = self.bit_stats()
        for key, actual in (("avg_bits", stats.avg_bits),
                            ("bits_per_weight", stats.bits_per_weight)):
            stated = getattr(self.config, key)
            if not abs(stated - actual) <= BITS_TOLERANCE:  # also refuses a stated NaN
                raise FormatError(f"{self.path / 'config.json'}: quantization_config.{key}="
                                  f"{stated!r}, but the tensors give {actual:.6f}")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory as a dict; SFMPError naming the file otherwise."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise SFMPError(f"{path}: not a model directory (no config.json)")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SFMPError(f"{cfg_file}: invalid JSON ({e})") from e
    except OSError as e:
        raise SFMPError(f"{cfg_file}: cannot read ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise SFMPError(f"{cfg_file}: expected a JSON object, got {type(data).__name__}")
    qc = data.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise FormatError(f"{cfg_file}: quantization_config must be a JSON object, got "
                          f"{type(qc).__name__}")
    return data


def is_sfmp_checkpoint(path: str | os.PathLike) -> bool:
    if not (Path(path) / "config.json").is_file():
        return False
    qc = read_hf_config(path).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def read_safetensors(path: str | os.PathLike, version: int = FORMAT_VERSION,
                     verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """(all tensors, tensor -> file) of every *.safetensors file in a directory (safetensors
    only, never pickle). Version 2 files must record checksums; verify: compare every tensor
    with its checksum."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SFMPError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    unchecked = []
    for f in files:
        part, recorded = read_weights(f, required=version >= 2, verify=verify)
        if not recorded:
            unchecked.append(f.name)
        for key, tensor in part.items():
            if key in tensors:
                raise FormatError(f"{f}: tensor {key}: also stored in {where[key]}")
            tensors[key], where[key] = tensor, f
    check_index(Path(path), files, where)
    if unchecked:
        log.warning("%s: format version %d records no checksums (%s): corruption after export "
                    "cannot be detected; quantize again with this sfmp-serve to add them", path,
                    version, ", ".join(unchecked))
    return tensors, where


def load_checkpoint(path: str | os.PathLike, validate: bool = True,
                    verify: bool = True) -> Checkpoint:
    """Read an SFMP checkpoint directory. validate: structure, values and bit statistics of
    every tensor; verify: every tensor against its checksum (format version 2)."""
    hf_config = read_hf_config(path)
    qc = hf_config.get("quantization_config")
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise SFMPError(f"{path}: not an SFMP checkpoint (config.json has no "
                        f"quantization_config with quant_method '{QUANT_METHOD}')")
    config = SFMPConfig.from_dict(qc)
    tensors, files = read_safetensors(path, config.format_version, verify)
    ckpt = Checkpoint(Path(path), hf_config, config, tensors, files)
    if validate:
        ckpt.validate()
    return ckpt


def checkpoint_config(config: SFMPConfig, stats: BitStats) -> SFMPConfig:
    """`config` as written: this format version, avg_bits and bits_per_weight as the tensors
    give them (whatever `config` says)."""
    return replace(config, format_version=FORMAT_VERSION, avg_bits=round(stats.avg_bits, 6),
                   bits_per_weight=round(stats.bits_per_weight, 6))


def write_config(directory: Path, hf_config: Mapping[str, Any], config: SFMPConfig) -> None:
    """config.json: the model's config, `quantization_config` and the transformers guard."""
    cfg = dict(hf_config)
    cfg["quantization_config"] = config.to_dict()
    cfg[TRANSFORMERS_GUARD_KEY] = TRANSFORMERS_GUARD
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_checkpoint(out_dir: str | os.PathLike, hf_config: Mapping[str, Any],
                     config: SFMPConfig, tensors: Mapping[str, torch.Tensor],
                     copy_files: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                     text_files: Mapping[str, str] | None = None) -> Path:
    """Validate and write a checkpoint (format version 2) atomically.

    The checkpoint is validated first, as load_checkpoint would: nothing invalid is ever
    written. avg_bits and bits_per_weight are recorded as the tensors give them, whatever
    `config` says. Weights larger than `max_shard_size` bytes are split into shards with an
    index (sfmp_serve/shards.py), tensors in the order given. `text_files` (name -> text) are
    written beside them (recipe.yaml, README.md). The directory is assembled beside `out_dir`
    and renamed into place (sfmp_serve.atomic_dir): a crash or an exception never leaves a
    partial checkpoint, and `overwrite` keeps the old one at `out_dir` until the new one is
    complete.
    """
    ckpt = Checkpoint(Path(out_dir), dict(hf_config), config, dict(tensors))
    ckpt.config = config = checkpoint_config(config, ckpt.bit_stats())
    ckpt.validate()
    sizes = [(k, t.numel() * t.element_size()) for k, t in tensors.items()]
    shards = split_units(sizes, max_shard_size)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_config(tmp, hf_config, config)
        names = shard_names(len(shards))
        for name, keys in zip(names, shards):
            write_weights(tmp / name, {k: tensors[k] for k in keys}, WEIGHTS_METADATA)
        if len(shards) > 1:
            write_index(tmp, {k: name for name, keys in zip(names, shards) for k in keys},
                        sum(n for _, n in sizes))
        for f in copy_files:
            shutil.copy2(f, tmp / Path(f).name)
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)
