"""Launch planning for the tensor-core family (mma.cuh): pure functions of the shapes.

Batches of up to MMA_MAX_M rows run the mma kernel; larger ones gather x once, dequantize the
weight from the same fragment-order words into a scratch of about half the L2 cache per chunk of
rows, and let cuBLAS multiply each chunk while it is still in L2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sfmp_serve.ops.cuda.mma_repack import KBLOCK_CHUNKS, CHUNK_COLS, TILE_ROWS, WARPS_PER_CTA
from sfmp_serve.ops.cuda.sources import MMA_BATCH_TILES

MMA_MAX_M = 128  # above: dequant + cuBLAS (the design's crossover; to be tuned on the GPU)
MMA_MAX_ZCHUNKS = 2  # z-chunks of 8 * NB rows in one launch: M <= 128 per launch
MMA_THREADS = 32 * WARPS_PER_CTA
CTAS_PER_SM = 4  # grid size the split-K aims at, in multiples of the SM count
XS_STRIDE = KBLOCK_CHUNKS * CHUNK_COLS + 8  # kXsStride in mma.cuh (halves per staged x row)
DEQUANT_KBLOCKS_PER_CTA = 4  # k-blocks each warp of the dequant kernel walks
GATHER_THREADS = 256
ROWS_PER_CTA = TILE_ROWS * WARPS_PER_CTA


def mma_smem_bytes(nb: int) -> int:
    """Dynamic shared memory of one mma block: x [2][8 NB][XS_STRIDE] (2 bytes) + sums [2][8 NB]."""
    return 2 * 8 * nb * XS_STRIDE * 2 + 2 * 8 * nb * 4


@dataclass(frozen=True)
class MmaPlan:
    nb: int  # n8 tiles of the batch per z-chunk (the kernel specialization)
    zchunks: int
    row_blocks: int
    splits: int
    kb_per_split: int
    smem_bytes: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.row_blocks * self.zchunks, self.splits, 1)

    @property
    def rows(self) -> int:
        """Batch rows one launch covers."""
        return 8 * self.nb * self.zchunks


def plan_mma(m: int, n_tiles: int, n_kblocks: int, multiprocessors: int) -> MmaPlan:
    """One launch for m <= MMA_MAX_M batch rows: specialization, z-chunks and split-K.

    The split count is the smallest that gives about CTAS_PER_SM blocks per SM, evened out so
    that every split has the same number of k-blocks (the last may have fewer, never 0)."""
    if not 1 <= m <= MMA_MAX_ZCHUNKS * 8 * MMA_BATCH_TILES[-1] or n_tiles < 1 or n_kblocks < 1 \
            or multiprocessors < 1:
        raise ValueError(f"plan_mma: bad shape m={m} tiles={n_tiles} k-blocks={n_kblocks} "
                         f"SMs={multiprocessors}")
    nb = next((t for t in MMA_BATCH_TILES if 8 * t >= m), MMA_BATCH_TILES[-1])
    zchunks = math.ceil(m / (8 * nb))
    row_blocks = math.ceil(n_tiles / WARPS_PER_CTA)
    wanted = math.ceil(CTAS_PER_SM * multiprocessors / (row_blocks * zchunks))
    splits = max(1, min(n_kblocks, wanted))
    per_split = math.ceil(n_kblocks / splits)
    splits = math.ceil(n_kblocks / per_split)
    return MmaPlan(nb, zchunks, row_blocks, splits, per_split, mma_smem_bytes(nb))


@dataclass(frozen=True)
class MmaDequantPlan:
    chunk_tiles: int  # tiles dequantized (and multiplied) at a time
    whole: bool  # one chunk, rows written in the original output order: no gather of y
    kb_per_block: int = DEQUANT_KBLOCKS_PER_CTA

    def chunks(self, n_tiles: int) -> list[tuple[int, int]]:
        """[tile_begin, tile_end) of every chunk."""
        return [(t, min(t + self.chunk_tiles, n_tiles)) for t in range(0, n_tiles,
                                                                       self.chunk_tiles)]

    def grid(self, tiles: int, n_kblocks: int) -> tuple[int, int, int]:
        return (math.ceil(tiles / WARPS_PER_CTA), math.ceil(n_kblocks / self.kb_per_block), 1)


def plan_mma_dequant(out_features: int, n_tiles: int, padded_cols: int,
                     scratch_bytes: int) -> MmaDequantPlan:
    """Whole matrix when it fits the scratch (rows land in the original order and cuBLAS
    writes y); else chunks of whole thread-block rows that fit it."""
    if out_features * padded_cols * 2 <= scratch_bytes:
        return MmaDequantPlan(n_tiles, True)
    rows = scratch_bytes // (padded_cols * 2) // ROWS_PER_CTA * ROWS_PER_CTA
    return MmaDequantPlan(max(ROWS_PER_CTA, rows) // TILE_ROWS, False)
