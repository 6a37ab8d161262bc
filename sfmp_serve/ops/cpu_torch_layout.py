"""Runtime layout of the plain-torch CPU path (ops/cpu_torch.py), built once per layer from the canonical format.

The output rows of a (fused) layer are cut into tiles of equal height (block-rows, or equal
parts of them), the tiles into chunks of about CHUNK_ELEMS weights. Inside a chunk, the blocks
(one tile x one input group) with the same number of words per plane row form a width class
(only a layer's ragged last group differs). A class stores its plane bytes *plane-major*:
blocks sorted by bit-width, descending, so the planes (2j, 2j+1) of every block that has them
form one contiguous run, decoded by one table lookup for all bit-widths at once. Nothing here
copies weights out of their packed form: the bytes are only regrouped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sfmp_serve.format import WORD_BITS, LayerGeometry, PackedLinear, SFMPConfig
from sfmp_serve.ops.runtime import FusedLayer

# Weights decoded per chunk: 512 K -> a 2 MB float32 tile, about one L2 cache.
CHUNK_ELEMS = 1 << 19
# Below this common tile height, tiles follow each block-row's own height instead.
MIN_TILE_ROWS = 16


@dataclass
class PairRun:
    """Planes (2j, 2j+1) of the class's blocks with at least 2j+2 bits (a prefix of them)."""

    shift: int  # 2j
    data: torch.Tensor  # int16 [n]: low byte plane 2j, high byte plane 2j+1, same 8 inputs
    split: int  # data[:split]: blocks with more planes; data[split:]: blocks whose top pair it is
    top_bits: int  # 2j + 2


@dataclass
class TopPlane:
    """The top plane of the class's blocks with an odd bit-width (a contiguous range)."""

    bits: int
    start: int  # first byte position in the class
    data: torch.Tensor  # uint8 [n]


@dataclass
class WidthClass:
    cols: int  # 32 * words per plane row
    n: int  # byte positions (8 inputs each) of the class
    pairs: list[PairRun]
    tops: list[TopPlane]
    group: torch.Tensor  # int64 [blocks]: input group of each block, in decode order


@dataclass
class Chunk:
    rows: int  # rows of every tile of the chunk
    n_tiles: int
    classes: list[WidthClass]
    tile: torch.Tensor | None  # int64 [blocks]: tile of each block (None: single tile)
    scale: torch.Tensor  # float32 [blocks, 1, rows] = 2 alpha
    offset: torch.Tensor  # float32 [n_tiles, groups, rows] = alpha + beta


@dataclass
class CpuLayer:
    """Runtime state of one (fused) layer on the CPU."""

    in_features: int
    groups: int
    group_cols: int  # padded columns per group (32 * words of a full group)
    in_gather: torch.Tensor  # int64 [groups * group_cols]; in_features = the zero column
    pad_input: bool
    out_gather: torch.Tensor  # int64 [out_features]: y = y_chunks[:, out_gather]
    chunks: list[Chunk] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class _Tile:
    shard: int
    block_row: int
    row0: int  # first row inside the shard's reordered rows
    rows: int
    cat_row0: int  # first row inside the concatenated reordered output


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
def _largest_divisor(n: int, limit: int) -> int:
    return next(d for d in range(max(1, min(n, limit)), 0, -1) if n % d == 0)


def _tile_height(heights: list[int], max_rows: int) -> int | None:
    """One tile height dividing every block-row height (e.g. 64 for SmolLM2's 576 = 512 + 64
    rows next to 192-row k/v shards), so tiles of all shards share chunks: fewer, larger ops.
    None when the common divisor is too small to make worthwhile GEMMs."""
    tile = _largest_divisor(math.gcd(*heights), max_rows)
    return tile if tile >= MIN_TILE_ROWS else None


def _split(total: int, max_rows: int) -> list[int]:
    """Near-equal parts of at most max_rows rows."""
    parts = math.ceil(total / max_rows)
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _block_row_spans(shard: PackedLinear, config: SFMPConfig) -> list[tuple[int, int]]:
    rows = shard.geometry(config).rows().tolist()
    return [(sum(rows[:i]), n) for i, n in enumerate(rows)]


def plan_chunks(layer: FusedLayer, k_cols: int) -> list[list[_Tile]]:
    """Tiles of equal height grouped into chunks of at most CHUNK_ELEMS weights."""
    max_rows = max(1, CHUNK_ELEMS // k_cols)
    spans = [(s, r, row0, rows) for s, shard in enumerate(layer.shards)
             for r, (row0, rows) in enumerate(_block_row_spans(shard, layer.config))]
    height = _tile_height([rows for *_, rows in spans], max_rows)
    by_height: dict[int, list[_Tile]] = {}
    for s, r, row0, rows in spans:
        start = row0
        for tile in [height] * (rows // height) if height else _split(rows, max_rows):
            by_height.setdefault(tile, []).append(
                _Tile(s, r, start, tile, layer.row_offsets[s] + start))
            start += tile
    chunks = []
    for rows, tiles in by_height.items():
        per = max(1, CHUNK_ELEMS // (rows * k_cols))
        chunks += [tiles[i:i + per] for i in range(0, len(tiles), per)]
    return chunks


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------
def _block_bytes(layer: FusedLayer, tile: _Tile, group: int, words: int) -> torch.Tensor:
    """Plane bytes of block (tile.block_row, group), tile rows only: uint8 [b, rows, 4 words]."""
    shard = layer.shards[tile.shard]
    height = int(shard.geometry(layer.config).rows()[tile.block_row])
    first = tile.row0 - tile.block_row * layer.config.block_rows
    bits = int(shard.block_bits[tile.block_row, group])
    start = int(shard.block_offsets[tile.block_row, group])
    block = shard.qweight[start:start + bits * words * height].view(bits, words, height)
    # Explicit strides: .contiguous() keeps odd strides on size-1 dims, view(uint8) rejects them.
    piece = torch.empty(bits, tile.rows, words, dtype=torch.int32)
    piece.copy_(block[:, :, first:first + tile.rows].permute(0, 2, 1))
    return piece.view(torch.uint8)


def _width_class(cols: int, blocks: list[tuple[int, int, torch.Tensor]]) -> WidthClass:
    """blocks: (bits, group, plane bytes [bits, rows, cols / 8]), sorted by bits descending."""
    per_block = blocks[0][2][0].numel()  # byte positions of one block
    pairs, j = [], 0
    while blocks and blocks[0][0] >= 2 * j + 2:
        members = [b for b in blocks if b[0] >= 2 * j + 2]
        lo_hi = torch.stack([torch.stack((p[2 * j].flatten(), p[2 * j + 1].flatten()), -1)
                             for _, _, p in members])
        more = sum(1 for bits, _, _ in members if bits > 2 * j + 2)
        pairs.append(PairRun(2 * j, lo_hi.view(torch.int16).flatten(), more * per_block,
                             2 * j + 2))
        j += 1
    tops = []
    for bits in sorted({b for b, _, _ in blocks if b % 2}, reverse=True):
        first = next(i for i, blk in enumerate(blocks) if blk[0] == bits)
        data = torch.cat([p[bits - 1].flatten() for b, _, p in blocks if b == bits])
        tops.append(TopPlane(bits, first * per_block, data))
    return WidthClass(cols, len(blocks) * per_block, pairs, tops,
                      torch.tensor([g for _, g, _ in blocks], dtype=torch.int64))


def _build_chunk(layer: FusedLayer, tiles: list[_Tile], words: list[int]) -> Chunk:
    by_words: dict[int, list[tuple[int, int, int, torch.Tensor]]] = {}
    alphas, betas = [], []
    for ti, tile in enumerate(tiles):
        shard = layer.shards[tile.shard]
        for g, w in enumerate(words):
            bits = int(shard.block_bits[tile.block_row, g])
            by_words.setdefault(w, []).append((bits, ti, g, _block_bytes(layer, tile, g, w)))
        alphas.append(shard.alpha[tile.row0:tile.row0 + tile.rows].to(torch.float32))
        betas.append(shard.beta[tile.row0:tile.row0 + tile.rows].to(torch.float32))
    alpha, beta = torch.stack(alphas), torch.stack(betas)  # [n_tiles, rows, groups]
    classes, order = [], []
    for w in sorted(by_words):
        blocks = sorted(by_words[w], key=lambda blk: -blk[0])  # stable: keeps tile order
        order += [(ti, g) for _, ti, g, _ in blocks]
        classes.append(_width_class(w * WORD_BITS, [(b, g, p) for b, _, g, p in blocks]))
    tile_of = torch.tensor([ti for ti, _ in order], dtype=torch.int64)
    group_of = torch.tensor([g for _, g in order], dtype=torch.int64)
    scale = (2 * alpha[tile_of, :, group_of])[:, None, :]  # [blocks, 1, rows]
    return Chunk(rows=tiles[0].rows, n_tiles=len(tiles), classes=classes,
                 tile=tile_of if len(tiles) > 1 else None, scale=scale.contiguous(),
                 offset=(alpha + beta).transpose(1, 2).contiguous())


def _input_gather(layer: FusedLayer, geo: LayerGeometry,
                  group_cols: int) -> tuple[torch.Tensor, bool]:
    """Index into [x | 0] giving the reordered input with each group padded to group_cols."""
    gather = torch.full((geo.n_groups, group_cols), layer.spec.in_features, dtype=torch.int64)
    start = 0
    for g, cols in enumerate(geo.cols().tolist()):
        gather[g, :cols] = layer.input_perm[start:start + cols]
        start += cols
    return gather.flatten(), bool((geo.cols() < group_cols).any())


def _tensors(state: CpuLayer) -> list[torch.Tensor]:
    out = [state.in_gather, state.out_gather]
    for chunk in state.chunks:
        out += [t for t in (chunk.tile, chunk.scale, chunk.offset) if t is not None]
        for cls in chunk.classes:
            out += [cls.group, *(r.data for r in cls.pairs), *(t.data for t in cls.tops)]
    return out


def build(layer: FusedLayer) -> CpuLayer:
    """The CPU runtime state of a fused layer."""
    geo = layer.shards[0].geometry(layer.config)
    words = geo.words().tolist()
    group_cols = max(words) * WORD_BITS
    in_gather, pad = _input_gather(layer, geo, group_cols)
    plan = plan_chunks(layer, geo.n_groups * group_cols)
    chunk_rows = torch.cat([torch.arange(t.cat_row0, t.cat_row0 + t.rows)
                            for tiles in plan for t in tiles])
    cat_to_chunk = torch.empty_like(chunk_rows)
    cat_to_chunk[chunk_rows] = torch.arange(chunk_rows.numel())
    state = CpuLayer(in_features=layer.spec.in_features, groups=geo.n_groups,
                     group_cols=group_cols, in_gather=in_gather, pad_input=pad,
                     out_gather=cat_to_chunk[layer.output_gather],
                     chunks=[_build_chunk(layer, tiles, words) for tiles in plan])
    state.nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    return state
