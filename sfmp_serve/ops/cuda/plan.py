"""Launch planning for the CUDA kernels: pure functions of the shapes, tested on the CPU.

Batches of up to LUT_MAX_M rows run the LUT kernel (lut_gemm.cuh); larger batches dequantize
chunks of rows into a scratch matrix and call cuBLAS (dequant.cuh + torch.mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sfmp_serve.format import WORD_BITS
from sfmp_serve.ops.cuda.sources import BATCH_TILES

# Largest batch the LUT kernel serves. Its cost grows about linearly with M (one table lookup
# per batch row), while dequant + cuBLAS costs one bandwidth-bound pass over the fp16 weight
# plus a matmul that is flat in M up to ~64: on an H100 the two cross between M = 4 and 8 at
# every Llama-3.1-8B shape (bench/kernels.py --paths).
LUT_MAX_M = 4
TABLE_ENTRIES = 256
CHUNKS_PER_WORD = WORD_BITS // 8
LUT_THREADS = 256  # rows per thread block; the __launch_bounds__ of kernels.cu
LUT_SMALL_THREADS = 128  # when 256-row tiles x all groups cannot fill the GPU
BLOCKS_PER_SM = 2  # grid size the split-K aims at, in multiples of the SM count
DEQUANT_THREADS = 256
DEQUANT_LANES = 4  # kDequantLanes in dequant.cuh: threads per row, one byte lane each
DEQUANT_TILE_ROWS = DEQUANT_THREADS // DEQUANT_LANES  # rows per thread block
DEQUANT_OUTPUTS_PER_THREAD = 64  # about: groups per block = this / (8 outputs x words)
# Scratch for the dequantized weight. When the whole matrix fits, its rows are written in the
# original output order and the matmul writes y itself; a matrix split into chunks instead
# needs y in the reordered order and a gather of all of y afterwards, which at prefill sizes
# costs as much as the dequantization (M=2048 x 28672 outputs: 235 MB moved). 256 MiB holds
# every linear of an 8B model (the largest, 28672 x 4096 fp16, is 224 MiB) as one chunk; it
# is transient (one layer at a time), not kept per layer.
DEQUANT_SCRATCH_BYTES = 256 << 20
FINISH_THREADS = 256


def batch_tile(m: int) -> int:
    """Batch rows per LUT launch layer (MB): the smallest specialization holding m rows."""
    for mb in BATCH_TILES:
        if m <= mb:
            return mb
    return BATCH_TILES[-1]


def words_per_tile(mb: int) -> int:
    """Words of a group per table tile (LutTile<MB>::kWords in lut_gemm.cuh)."""
    return 4 if mb <= 2 else (2 if mb == 4 else 1)


def lut_smem_bytes(mb: int) -> int:
    """Shared memory of one LUT block: [4 KW chunks][256 entries][MB rows] fp32."""
    return words_per_tile(mb) * CHUNKS_PER_WORD * TABLE_ENTRIES * mb * 4


@dataclass(frozen=True)
class LutPlan:
    batch_tile: int  # MB
    threads: int  # rows per thread block
    row_tiles: int
    splits: int  # split-K over groups; > 1 needs the finish pass
    groups_per_split: int
    batch_chunks: int
    smem_bytes: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.row_tiles, self.splits, self.batch_chunks)


def plan_lut(m: int, out_features: int, n_groups: int, multiprocessors: int) -> LutPlan:
    """Tile a [m, K] x [K, N] LUT GEMM: rows per block, and a split-K that fills the GPU.

    256-row tiles amortize each table over more rows; 128-row tiles are used when even one
    group per block would leave SMs idle. The split count is the smallest that gives about
    BLOCKS_PER_SM blocks per SM, then evened out so that every split has the same number of
    groups (the last may have fewer, never 0).
    """
    if m < 1 or out_features < 1 or n_groups < 1 or multiprocessors < 1:
        raise ValueError(f"plan_lut: bad shape m={m} N={out_features} groups={n_groups} "
                         f"SMs={multiprocessors}")
    mb = batch_tile(m)
    chunks = math.ceil(m / mb)
    target = BLOCKS_PER_SM * multiprocessors
    threads = LUT_THREADS
    if math.ceil(out_features / threads) * n_groups * chunks < target:
        threads = LUT_SMALL_THREADS
    row_tiles = math.ceil(out_features / threads)
    wanted = math.ceil(target / (row_tiles * chunks))
    splits = max(1, min(n_groups, wanted))
    per_split = math.ceil(n_groups / splits)
    splits = math.ceil(n_groups / per_split)
    return LutPlan(mb, threads, row_tiles, splits, per_split, chunks, lut_smem_bytes(mb))


@dataclass(frozen=True)
class DequantPlan:
    chunk_rows: int  # rows dequantized (and multiplied) at a time
    n_chunks: int
    groups_per_block: int  # groups each thread walks (grid.y tiles the groups)
    group_tiles: int  # grid.y
    smem_bytes: int = 0  # the kernel keeps everything in registers

    @property
    def threads(self) -> tuple[int, int]:
        return (DEQUANT_THREADS, 1)

    @property
    def whole(self) -> bool:
        """All rows in one chunk: they are written in the original output order."""
        return self.n_chunks == 1

    def grid(self, rows: int, n_groups: int) -> tuple[int, int, int]:
        return (math.ceil(rows / DEQUANT_TILE_ROWS), self.group_tiles, 1)

    def chunks(self, out_features: int) -> list[tuple[int, int]]:
        """[row_begin, row_end) of every chunk."""
        return [(r, min(r + self.chunk_rows, out_features))
                for r in range(0, out_features, self.chunk_rows)]


def plan_dequant(out_features: int, in_features: int, group_size: int, element_bytes: int,
                 scratch_bytes: int = DEQUANT_SCRATCH_BYTES) -> DequantPlan:
    """Chunking and tiling of the dequantize + matmul path."""
    group_size = min(group_size, in_features)
    n_groups = math.ceil(in_features / group_size)
    words = math.ceil(group_size / WORD_BITS)  # most words of any group
    per_block = max(1, min(n_groups, DEQUANT_OUTPUTS_PER_THREAD // (8 * words)))
    rows = scratch_bytes // (in_features * element_bytes)
    rows = max(DEQUANT_TILE_ROWS, rows // DEQUANT_TILE_ROWS * DEQUANT_TILE_ROWS)
    rows = min(rows, out_features)
    return DequantPlan(rows, math.ceil(out_features / rows), per_block,
                       math.ceil(n_groups / per_block))
