"""Tensor-parallel layout of SFMP linears: which ranges a rank owns, its slice of every stored
tensor, and the plain linears (parts) it serves.

A version 4 checkpoint confines each linear's permutations and block grid to equal contiguous
ranges (docs/format.md, LayerGeometry): column-parallel linears (q/k/v, gate/up) split their
outputs ("out"), row-parallel ones (o_proj, down_proj) their inputs ("in"). vLLM gives rank r
of a tensor-parallel group of size tp a contiguous share of every split dimension, so a rank's
share is a contiguous run of ranges and, because parts are stored one after the other, a
contiguous slice of every stored tensor: `narrow` cuts it as the tensor arrives, the way vLLM's
own weight loaders narrow dense weights. `parts` then cuts a (local) linear into its ranges, each
a plain linear the op backends already run, and `serving_parts` arranges them for the op:
output ranges side by side (like vLLM's fused q/k/v), input ranges joined into one linear
(where a range ends in a ragged group, widened by zero columns that read zero activations), or,
when that padding would be large, one call per range, summed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import (TENSOR_SUFFIXES, TP_RANGES_SINCE, WORD_BITS, LayerGeometry,
                               PackedLinear, SFMPConfig)


def check_tensor_parallel(config: SFMPConfig, tp: int) -> None:
    """SFMPError unless a checkpoint quantized with `config` can be served at tensor parallel
    size `tp` (sfmp_serve/tp.py: every rank loads whole ranges)."""
    if tp > 1 and config.tp_shards % tp:
        hint = ("it was quantized before tensor-parallel ranges existed (format version "
                f"{config.format_version})" if config.format_version < TP_RANGES_SINCE else
                f"it was quantized with --tp-shards {config.tp_shards}")
        raise SFMPError(f"tensor parallel size {tp} does not divide the checkpoint's "
                        f"tp_shards={config.tp_shards} ({hint}); serve it at a tensor parallel "
                        f"size dividing {config.tp_shards}, or quantize again with "
                        f"--tp-shards {tp} (or a multiple)")


@dataclass(frozen=True)
class RankShare:
    """The ranges of one split dimension that one rank owns: [first, first + count) of n."""

    dim: str  # "out" or "in"
    n: int
    first: int
    count: int

    @property
    def ranges(self) -> tuple[int, int]:
        return (self.count, 1) if self.dim == "out" else (1, self.count)


def rank_share(layer: str, split: tuple[str, int] | None, tp: int,
               rank: int) -> RankShare | None:
    """The share of rank `rank` of `tp` in a linear with tensor-parallel `split` (dim, n);
    None at tp 1.

    More ranges than ranks: each rank owns n / tp consecutive ranges. Fewer (a K/V projection
    with fewer KV heads than ranks): vLLM replicates each head on tp / n ranks, and so do we.
    """
    if tp == 1:
        return None
    if split is None:
        raise SFMPError(f"layer {layer}: stored as one tensor-parallel range, so it cannot be "
                        f"split over {tp} ranks; quantize with --tp-shards {tp} (or a multiple)")
    dim, n = split
    if n % tp == 0:
        return RankShare(dim, n, rank * (n // tp), n // tp)
    if dim == "out" and tp % n == 0:
        return RankShare(dim, n, rank // (tp // n), 1)
    raise SFMPError(f"layer {layer}: its {n} tensor-parallel ranges cannot be shared by "
                    f"{tp} ranks (tensor parallel size must divide {n})")


def share_rows_cols(geo: LayerGeometry, share: RankShare) -> tuple[slice, slice, slice, slice]:
    """(rows, columns, block-rows, groups) of the full layer that `share` owns."""
    rows, cols = slice(0, geo.out_features), slice(0, geo.in_features)
    brows, groups = slice(0, geo.n_block_rows), slice(0, geo.n_groups)
    end = share.first + share.count
    if share.dim == "out":
        rows = slice(share.first * geo.part_rows, end * geo.part_rows)
        brows = slice(share.first * geo.part_block_rows, end * geo.part_block_rows)
    else:
        cols = slice(share.first * geo.part_cols, end * geo.part_cols)
        groups = slice(share.first * geo.part_groups, end * geo.part_groups)
    return rows, cols, brows, groups


def word_range(geo: LayerGeometry, offsets: torch.Tensor, share: RankShare,
               total: int) -> tuple[int, int]:
    """[start, end) of the words of `share` in qweight: its parts are stored consecutively."""
    _, _, brows, groups = share_rows_cols(geo, share)
    start = int(offsets[brows.start, groups.start])
    if share.first + share.count == share.n:
        return start, total
    nxt = (brows.stop, 0) if share.dim == "out" else (0, groups.stop)
    return start, int(offsets[nxt])


def narrow(suffix: str, tensor: torch.Tensor, geo: LayerGeometry, share: RankShare,
           offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The part of one stored tensor that `share` owns, as a copy (so the full tensor can be
    freed). Permutation entries and block offsets keep their full-layer values (`localize`
    rebases them). qweight needs the full layer's block_offsets."""
    rows, cols, brows, groups = share_rows_cols(geo, share)
    if suffix in ("alpha", "beta"):
        cut = tensor[rows, groups]
    elif suffix in ("block_bits", "block_offsets"):
        cut = tensor[brows, groups]
    elif suffix == "input_perm":
        cut = tensor[cols]
    elif suffix in ("output_perm", "bias"):
        cut = tensor[rows]
    elif suffix == "qweight":
        if offsets is None:
            raise ValueError("qweight is cut by the layer's block_offsets")
        start, end = word_range(geo, offsets, share, tensor.numel())
        cut = tensor[start:end]
    else:
        raise ValueError(f"unknown SFMP tensor {suffix!r}")
    return cut.clone()


def localize(packed: PackedLinear, geo: LayerGeometry, share: RankShare) -> PackedLinear:
    """A rank's narrowed tensors as a linear of its own: offsets from its first word,
    permutations of its own rows or columns; its ranges are the share's."""
    rows, cols, _, _ = share_rows_cols(geo, share)
    base = int(packed.block_offsets[0, 0])  # the first block of the first owned part
    out = replace(packed, block_offsets=packed.block_offsets - base, ranges=share.ranges)
    if share.dim == "out":
        out.output_perm = packed.output_perm - rows.start
    else:
        out.input_perm = packed.input_perm - cols.start
    return out


def parts(packed: PackedLinear, config: SFMPConfig) -> list[PackedLinear]:
    """The ranges of a linear as plain linears, each what a rank owning just that range keeps
    (`narrow` + `localize`): a valid linear of format version 3's layout."""
    geo = packed.geometry(config)
    if geo.n_parts == 1:
        return [packed]
    dim, n = ("out", geo.row_ranges) if geo.row_ranges > 1 else ("in", geo.col_ranges)
    out = []
    for i in range(n):
        share = RankShare(dim, n, i, 1)
        kept = {s: narrow(s, getattr(packed, s), geo, share, packed.block_offsets)
                for s in TENSOR_SUFFIXES}
        # an input split sums its parts: the bias belongs to the first only
        bias = (None if packed.bias is None or (dim == "in" and i) else
                narrow("bias", packed.bias, geo, share))
        out.append(localize(PackedLinear(**kept, bias=bias, ranges=packed.ranges), geo, share))
    return out


def join_inputs(pieces: list[PackedLinear], config: SFMPConfig) -> PackedLinear | None:
    """Input ranges of one linear (in order, sharing the output order) as ONE plain linear,
    when every range is a whole number of groups (then their grids line up); else None."""
    if len(pieces) == 1:
        return pieces[0]
    if any(p.in_features % config.group_size for p in pieces):
        return None
    first = pieces[0]
    for p in pieces[1:]:
        if not torch.equal(p.output_perm, first.output_perm):
            raise FormatError("the input ranges of one linear have different output orders")
    rows = first.geometry(config).n_block_rows
    # each piece's block-row r is words [starts[r], starts[r + 1]) of its qweight
    starts = [p.block_offsets[:, 0].tolist() + [p.qweight.numel()] for p in pieces]
    chunks = [p.qweight[st[r]:st[r + 1]] for r in range(rows) for p, st in zip(pieces, starts)]
    width = 0
    perms = []
    for p in pieces:
        perms.append(p.input_perm + width)
        width += p.in_features
    bits = torch.cat([p.block_bits for p in pieces], dim=1)
    geo = LayerGeometry(first.out_features, width, config.group_size, config.block_rows)
    offsets, _ = geo.offsets(bits)
    return PackedLinear(qweight=torch.cat(chunks), alpha=torch.cat([p.alpha for p in pieces], 1),
                        beta=torch.cat([p.beta for p in pieces], 1), block_bits=bits,
                        block_offsets=offsets.to(torch.int32), input_perm=torch.cat(perms),
                        output_perm=first.output_perm, bias=first.bias)


def widen_last_group(piece: PackedLinear, config: SFMPConfig) -> PackedLinear:
    """A plain linear whose ragged last group is widened to a whole group: the new inputs'
    bits are zero and their activations must be zero (`serving_parts` gathers them from a
    zero column), so they add nothing; the grid is then the uniform one of a wider linear."""
    geo = piece.geometry(config)
    last = int(geo.cols()[-1])
    if last == config.group_size:
        return piece
    old, new = -(-last // WORD_BITS), -(-config.group_size // WORD_BITS)
    rows, words = geo.rows().tolist(), geo.block_words(piece.block_bits)
    chunks = []
    for r in range(geo.n_block_rows):
        for g in range(geo.n_groups):
            start = int(piece.block_offsets[r, g])
            block = piece.qweight[start:start + int(words[r, g])]
            if g == geo.n_groups - 1 and new != old:
                bits = int(piece.block_bits[r, g])
                wide = block.new_zeros(bits, new, rows[r])
                wide[:, :old] = block.view(bits, old, rows[r])
                block = wide.flatten()
            chunks.append(block)
    width = geo.n_groups * config.group_size
    wide_geo = LayerGeometry(piece.out_features, width, config.group_size, config.block_rows)
    offsets, _ = wide_geo.offsets(piece.block_bits)
    return replace(piece, qweight=torch.cat(chunks), block_offsets=offsets.to(torch.int32),
                   input_perm=torch.cat([piece.input_perm, torch.arange(
                       piece.in_features, width, dtype=piece.input_perm.dtype)]))


# Input ranges with ragged groups are widened and joined (one call, zero activations in the
# padding) while that reads at most this many times the real weights; beyond, one call each.
MAX_PADDING = 2.0


@dataclass(frozen=True)
class InputPart:
    """Linears that read columns [start, stop) of the layer's input; their outputs side by
    side (in vLLM's order) are this part's contribution, summed over the parts. With `gather`
    the part reads x_ext[:, gather] instead, x_ext being x with a zero column appended (the
    padding of widened input ranges)."""

    start: int
    stop: int
    names: tuple[str, ...]
    shards: tuple[PackedLinear, ...]
    gather: torch.Tensor | None = None


def serving_parts(shard_names: tuple[str, ...], shards: tuple[PackedLinear, ...],
                  config: SFMPConfig) -> list[InputPart]:
    """How the op runs one vLLM layer made of `shards` (each possibly cut into ranges): output
    ranges become side-by-side shards; input ranges (a row-parallel layer: one shard) become
    one joined linear when their groups line up, else input parts whose outputs are summed."""
    split_in = [s.ranges[1] > 1 for s in shards]
    if not any(split_in):
        names, pieces = [], []
        for name, shard in zip(shard_names, shards):
            cut = parts(shard, config)
            names += [name] if len(cut) == 1 else [f"{name}[{i}]" for i in range(len(cut))]
            pieces += cut
        return [InputPart(0, shards[0].in_features, tuple(names), tuple(pieces))]
    if len(shards) != 1:
        raise FormatError(f"layer {shard_names[0]}: linears split by inputs cannot be fused "
                          "with others")
    cut = parts(shards[0], config)
    joined = join_inputs(cut, config)
    if joined is not None:
        return [InputPart(0, joined.in_features, shard_names, (joined,))]
    wide = [widen_last_group(piece, config) for piece in cut]
    width, padded = shards[0].in_features, sum(p.in_features for p in wide)
    if padded <= MAX_PADDING * width:
        real = width // len(cut)
        local = torch.arange(wide[0].in_features)
        gather = torch.cat([torch.where(local < real, j * real + local, width)
                            for j in range(len(cut))])
        return [InputPart(0, width, shard_names, (join_inputs(wide, config),), gather)]
    out, start = [], 0
    for i, piece in enumerate(cut):
        out.append(InputPart(start, start + piece.in_features, (f"{shard_names[0]}[{i}]",),
                             (piece,)))
        start += piece.in_features
    return out
