"""Search-free bit allocation over blocks (METHOD.md step 4), as pure functions.

All blocks of all linears are ranked together by importance (salience summed over the block).
The most important get the highest bit-width. Fractions count weights, not blocks: ragged edge
blocks are smaller, and the achieved average is the block-size-weighted mean.

Two policies give the importance:
- salience (METHOD.md): the block's summed Fisher diagonal;
- perturbation (FGMP): the block's Fisher-weighted squared rounding error at each width
  (`BlockErrors`). Blocks then take the widths that minimise the total error at the target
  average: every block starts at the lowest width, its upgrades along the lower convex hull of
  (bits, error) are ranked globally by error removed per added bit, and the prefix closest to
  the target is taken. One ranking, a threshold, no search; with errors proportional to
  importance / (2^b - 1)^2 it is the salience policy's three-level objective.
- one choice: every block gets it;
- two choices lo < hi: the top blocks get hi, as many as brings the average closest to target;
- three choices b1 < b2 < b3: one free fraction (that of b3) once the two constraints are
  fixed; sweep every cut k3 of the ranking, fill the least important blocks with b1 as far as
  the average requires, and keep the sweep point minimising sum importance / (2^b - 1)^2.
`fit_budget` bisects the target so the real checkpoint size fits a byte budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.format import MAX_BITS, LayerGeometry

log = logging.getLogger(__name__)

AVG_TOLERANCE = 0.01  # achieved average bits must be this close to the target
_PICK_TOLERANCE = 0.005  # three levels: sweep points this close compete on cost alone
DEFAULT_MIN_BITS = 2  # lowest bit-width a budget search may reach without --bit-choices


@dataclass(frozen=True)
class BlockErrors:
    """Perturbation policy: sum F (w - q_b(w))^2 of every block of one linear at each width."""

    widths: tuple[int, ...]
    errors: torch.Tensor  # float64 [len(widths), n_block_rows, n_groups]

    @property
    def shape(self) -> torch.Size:
        return self.errors.shape[1:]

    def numel(self) -> int:
        return self.errors[0].numel()

    def at(self, choices: Sequence[int]) -> torch.Tensor:
        """[len(choices), n_blocks] errors at `choices`."""
        missing = [b for b in choices if b not in self.widths]
        if missing:
            raise SFMPError(f"perturbation policy: no errors measured at {missing} bits "
                            f"(measured: {list(self.widths)})")
        return self.errors[[self.widths.index(b) for b in choices]].flatten(1)


@dataclass
class Allocation:
    block_bits: dict[str, torch.Tensor]  # linear -> uint8 [n_block_rows, n_groups]
    avg_bits: float  # achieved, weighted by block sizes
    target_bits: float
    bit_choices: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Checks and choices
# --------------------------------------------------------------------------------------------
def check_block_shape(group_size: int, block_rows: int) -> None:
    if group_size <= 0:
        raise SFMPError(f"--group-size={group_size}: must be a positive integer")
    if group_size % 8:
        raise SFMPError(f"--group-size={group_size}: must be a multiple of 8")
    if block_rows <= 0:
        raise SFMPError(f"--block-rows={block_rows}: must be a positive integer")


def parse_bit_choices(text: str) -> tuple[int, ...]:
    """'2,3,4' -> (2, 3, 4): sorted, distinct, each in 1..MAX_BITS."""
    try:
        choices = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError as e:
        raise SFMPError(f"--bit-choices={text!r}: expected integers like 2,3,4") from e
    check_choices(choices)
    return choices


def check_choices(choices: Sequence[int]) -> None:
    if not choices or any(not 1 <= b <= MAX_BITS for b in choices):
        raise SFMPError(f"--bit-choices={','.join(map(str, choices))}: each must be in "
                        f"1..{MAX_BITS}")
    if list(choices) != sorted(set(choices)):
        raise SFMPError(f"--bit-choices={','.join(map(str, choices))}: must be distinct")


def default_choices(target: float, levels: int) -> tuple[int, ...]:
    """levels=2: floor/ceil of the target (one level if integer); levels=3: the nearest
    integer and its two neighbours, e.g. 3.25 -> (2, 3, 4)."""
    if levels == 2:
        return tuple(sorted({math.floor(target), math.ceil(target)}))
    if levels == 3:
        mid = min(max(int(target + 0.5), 2), MAX_BITS - 1)
        return (mid - 1, mid, mid + 1)
    raise SFMPError(f"--levels={levels}: expected 2 or 3")


def resolve_choices(target: float, levels: int,
                    bit_choices: Sequence[int] | None) -> tuple[int, ...]:
    """The bit-widths used for `target`; SFMPError if the target is outside them."""
    if levels not in (2, 3):
        raise SFMPError(f"--levels={levels}: expected 2 or 3")
    if bit_choices is None:
        if not 1 <= target <= MAX_BITS:
            raise SFMPError(f"--bits={target}: must be in 1..{MAX_BITS}")
        return default_choices(target, levels)
    choices = tuple(bit_choices)
    check_choices(choices)
    if len(choices) != levels:
        raise SFMPError(f"--bit-choices={','.join(map(str, choices))}: {len(choices)} "
                        f"choices, but --levels={levels}")
    if not choices[0] <= target <= choices[-1]:
        raise SFMPError(f"--bits={target}: outside the bit choices "
                        f"[{choices[0]}, {choices[-1]}]")
    return choices


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def block_sums(matrix: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Sum of a reordered [out, in] matrix inside every block, float64 [n_block_rows, n_groups]."""
    n, k = matrix.shape
    row_block = geometry.row_block_index().to(matrix.device)
    col_group = geometry.col_group_index().to(matrix.device)
    per_row_block = torch.zeros(geometry.n_block_rows, k, dtype=torch.float64).index_add_(
        0, row_block, matrix.to(torch.float64))
    return torch.zeros(geometry.n_block_rows, geometry.n_groups,
                       dtype=torch.float64).index_add_(1, col_group, per_row_block)


def block_sizes(geometry: LayerGeometry) -> torch.Tensor:
    """Weights in every block (ragged edges smaller), int64 [n_block_rows, n_groups]."""
    return geometry.rows()[:, None] * geometry.cols()[None, :]


# --------------------------------------------------------------------------------------------
# Cut selection on the global ranking (blocks sorted by descending importance)
# --------------------------------------------------------------------------------------------
def _two_level(cum: torch.Tensor, total: int, lo: int, hi: int,
               target: float) -> torch.Tensor:
    """Per ranked block, its bits: the top-k blocks get `hi`, k brings the average closest."""
    avg = lo + (hi - lo) * cum.to(torch.float64) / total
    k = int(torch.argmin((avg - target).abs()))
    bits = torch.full((cum.numel() - 1,), lo, dtype=torch.uint8)
    bits[:k] = hi
    return bits


def _three_level(imp: torch.Tensor, cum: torch.Tensor, total: int,
                 choices: tuple[int, int, int], target: float) -> torch.Tensor:
    """Sweep the top cut k3; for each, the bottom cut k1 that meets the average; min noise."""
    b1, b2, b3 = choices
    n = imp.numel()
    cum64 = cum.to(torch.float64)
    bottom = total - cum64.flip(0)  # bottom[j] = weights of the j least important blocks
    k3 = torch.arange(n + 1)
    w3 = cum64
    need1 = (b3 * w3 + b2 * (total - w3) - target * total) / (b2 - b1)
    upper = n - k3  # the b1 blocks must not overlap the b3 blocks
    j = torch.searchsorted(bottom, need1.clamp(min=0).contiguous())
    cands = torch.stack([j - 1, j]).clamp(min=0)
    cands = torch.minimum(cands, upper[None, :])
    w1 = bottom[cands]
    avg = (b3 * w3 + b2 * (total - w3 - w1) + b1 * w1) / total  # [2, n+1]
    pick = (avg - target).abs().argmin(0)
    k1 = cands.gather(0, pick[None])[0]
    dev = (avg.gather(0, pick[None])[0] - target).abs()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), imp.cumsum(0)])
    noise = [1.0 / (2.0 ** b - 1) ** 2 for b in choices]
    cost = (prefix[k3] * noise[2] + (prefix[n - k1] - prefix[k3]) * noise[1]
            + (prefix[n] - prefix[n - k1]) * noise[0])
    ok = dev <= max(_PICK_TOLERANCE, float(dev.min())) + 1e-12
    best = int(torch.where(ok, cost, torch.full_like(cost, math.inf)).argmin())
    bits = torch.full((n,), b2, dtype=torch.uint8)
    bits[:best] = b3
    bits[n - int(k1[best]):] = b1
    return bits


def _by_error(errors: torch.Tensor, size: torch.Tensor, target: float,
              choices: tuple[int, ...]) -> torch.Tensor:
    """Perturbation policy: per block, its bits. errors [C, B] (float64, at `choices`), size [B].

    Each block's upgrades follow the lower convex hull of its (bits, error) points, so their
    slopes (error removed per added bit and weight) decrease and a global ranking of all
    upgrades takes them in a valid order; the prefix whose average is closest to the target
    is kept."""
    n_choices, n_blocks = errors.shape
    width = torch.tensor(choices, dtype=torch.float64)
    weights = size.to(torch.float64)
    steps = []  # (slope, block, level reached, added bits x weights) of every upgrade
    blocks = torch.arange(n_blocks)
    if n_choices == 2:
        steps.append(((errors[0] - errors[1]) / ((width[1] - width[0]) * weights), blocks,
                      torch.ones(n_blocks, dtype=torch.int64), (width[1] - width[0]) * weights))
    elif n_choices == 3:
        s01 = (errors[0] - errors[1]) / ((width[1] - width[0]) * weights)
        s12 = (errors[1] - errors[2]) / ((width[2] - width[1]) * weights)
        s02 = (errors[0] - errors[2]) / ((width[2] - width[0]) * weights)
        hull = s12 <= s01  # the middle width lies on the hull: two upgrades, else one jump
        ones, twos = torch.ones(n_blocks, dtype=torch.int64), torch.full((n_blocks,), 2)
        steps.append((torch.where(hull, s01, s02)[None], blocks[None],
                      torch.where(hull, ones, twos)[None],
                      torch.where(hull, (width[1] - width[0]) * weights,
                                  (width[2] - width[0]) * weights)[None]))
        steps.append((s12[hull][None], blocks[hull][None], twos[hull][None],
                      ((width[2] - width[1]) * weights)[hull][None]))
        steps = [tuple(t.flatten() for t in step) for step in steps]
    elif n_choices != 1:
        raise SFMPError(f"--bit-choices: {n_choices} choices, at most 3 are supported")
    level = torch.zeros(n_blocks, dtype=torch.int64)
    if steps:
        slope, block, reach, cost = (torch.cat(parts) for parts in zip(*steps))
        # Stable, first upgrades listed first: equal slopes keep a valid order.
        order = torch.sort(slope, descending=True, stable=True).indices
        total = float(weights.sum())
        avg = (width[0] * total + torch.cat([torch.zeros(1, dtype=torch.float64),
                                              cost[order].cumsum(0)])) / total
        k = int(torch.argmin((avg - target).abs()))
        taken = order[:k]
        level.scatter_reduce_(0, block[taken], reach[taken], reduce="amax")
    return torch.tensor(choices, dtype=torch.uint8)[level]


def allocate(importance: Mapping[str, torch.Tensor | BlockErrors],
             sizes: Mapping[str, torch.Tensor], target: float, choices: Sequence[int],
             warn: bool = True) -> Allocation:
    """Bits for every block of every linear from one global ranking: of the blocks' importance
    (salience policy), or of their error reductions (perturbation policy, BlockErrors)."""
    choices = tuple(choices)
    names = list(importance)
    size = torch.cat([sizes[n].flatten().to(torch.int64) for n in names])
    total = int(size.sum())
    if names and isinstance(importance[names[0]], BlockErrors):
        errors = torch.cat([importance[n].at(choices) for n in names], 1)
        flat = _by_error(errors, size, target, choices)
    else:
        imp = torch.cat([importance[n].flatten().to(torch.float64) for n in names])
        # Stable: equal importance keeps model order, so the result is deterministic.
        order = torch.sort(imp, descending=True, stable=True).indices
        cum = torch.cat([torch.zeros(1, dtype=torch.int64), size[order].cumsum(0)])
        if len(choices) == 1:
            ranked = torch.full((imp.numel(),), choices[0], dtype=torch.uint8)
        elif len(choices) == 2:
            ranked = _two_level(cum, total, choices[0], choices[1], target)
        elif len(choices) == 3:
            ranked = _three_level(imp[order], cum, total, choices, target)
        else:
            raise SFMPError(f"--bit-choices: {len(choices)} choices, at most 3 are supported")
        flat = torch.empty_like(ranked)
        flat[order] = ranked
    avg = float((flat.to(torch.int64) * size).sum()) / total
    if warn and abs(avg - target) > AVG_TOLERANCE:
        log.warning("achieved average %.4f bits for target %.4f: the blocks are too coarse "
                    "for %.2f-bit precision (use smaller --block-rows/--group-size)", avg,
                    target, AVG_TOLERANCE)
    out, start = {}, 0
    for name in names:
        count = importance[name].numel()
        out[name] = flat[start:start + count].view(importance[name].shape).clone()
        start += count
    return Allocation(out, avg, target, choices)


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------
def budget_too_small(budget_gb: float, lowest: float, smallest_bytes: int) -> str:
    return (f"--budget-gb={budget_gb:g}: too small; the smallest checkpoint ({lowest:g} bits "
            f"in every block) needs {smallest_bytes / 1e9:.6g} GB ({smallest_bytes} bytes)")


def fit_budget(budget_bytes: int, allocate_at: Callable[[float], Allocation],
               size_of: Callable[[Allocation], int], lowest: float, highest: float,
               resolution: float = 1e-3) -> Allocation:
    """The allocation of the largest target in [lowest, highest] whose size fits the budget.

    Bisection on the target; every probe is sized exactly (size_of on the real allocation).
    """
    best = allocate_at(lowest)
    smallest = size_of(best)
    if smallest > budget_bytes:
        raise SFMPError(budget_too_small(budget_bytes / 1e9, lowest, smallest))
    top = allocate_at(highest)
    if size_of(top) <= budget_bytes:
        return top
    lo, hi = lowest, highest
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        probe = allocate_at(mid)
        if size_of(probe) <= budget_bytes:
            lo, best = mid, probe
        else:
            hi = mid
    log.info("budget %.4f GB: target %.4f bits, achieved %.4f, %.4f GB", budget_bytes / 1e9,
             best.target_bits, best.avg_bits, size_of(best) / 1e9)
    return best


# --------------------------------------------------------------------------------------------
# Pinned linears (--pin): fixed widths, counted in the average
# --------------------------------------------------------------------------------------------
def allocate_with_pins(importance: Mapping[str, torch.Tensor],
                       sizes: Mapping[str, torch.Tensor], pinned: Mapping[str, int],
                       target: float, choices_for: Callable[[float], Sequence[int]],
                       bounds: tuple[float, float], warn: bool = True) -> Allocation:
    """Bits for every block: each pinned linear (name -> bits, with its `sizes`) at its width,
    the free linears (`importance`) ranked as `allocate` does, at the average that brings the
    average over all of them to `target`. `choices_for(free_target)` gives the free widths;
    a free target outside `bounds` (the lowest and highest they may take) is an SFMPError.
    The recorded choices include the pins'."""
    free_weights = sum(int(sizes[n].sum()) for n in sizes if n not in pinned)
    pinned_bits = sum(b * int(sizes[n].sum()) for n, b in pinned.items())
    total = free_weights + sum(int(sizes[n].sum()) for n in pinned)
    fixed = {n: torch.full(sizes[n].shape, b, dtype=torch.uint8) for n, b in pinned.items()}
    free_target = pinned_free_target(sizes, pinned, target, bounds)
    if free_target is None:
        return Allocation(fixed, pinned_bits / total, target,
                          tuple(sorted(set(pinned.values()))))
    choices = tuple(choices_for(free_target))
    free = allocate(importance, sizes, free_target, choices, warn=False)
    avg = (free.avg_bits * free_weights + pinned_bits) / total
    if warn and abs(avg - target) > AVG_TOLERANCE:
        log.warning("achieved average %.4f bits for target %.4f (pinned linears included): "
                    "the free blocks are too coarse", avg, target)
    return Allocation({**free.block_bits, **fixed}, avg, target,
                      tuple(sorted(set(choices) | set(pinned.values()))))


def pinned_free_target(sizes: Mapping[str, torch.Tensor], pinned: Mapping[str, int],
                       target: float, bounds: tuple[float, float]) -> float | None:
    """The average the free linears (those of `sizes` not in `pinned`) need for the overall
    average to be `target`; None if every linear is pinned. SFMPError, in one line, when it is
    outside `bounds` (the lowest and highest widths they may take): pure arithmetic on the
    sizes, so a run checks it before its salience pass."""
    pinned_weights = sum(int(sizes[n].sum()) for n in pinned)
    pinned_bits = sum(b * int(sizes[n].sum()) for n, b in pinned.items())
    free_weights = sum(int(s.sum()) for n, s in sizes.items() if n not in pinned)
    total = pinned_weights + free_weights
    if not free_weights:
        if abs(pinned_bits / total - target) > AVG_TOLERANCE:
            raise SFMPError(f"--pin: every quantized linear is pinned, at "
                            f"{pinned_bits / total:.4f} bits on average, not the target "
                            f"{target:g}")
        return None
    free_target = (target * total - pinned_bits) / free_weights
    if not bounds[0] - 1e-9 <= free_target <= bounds[1] + 1e-9:
        raise SFMPError(
            f"--pin makes the target {target:g} bits unreachable: the pinned linears hold "
            f"{pinned_weights / total:.1%} of the quantized weights at "
            f"{pinned_bits / pinned_weights:.3g} bits, so the others would need "
            f"{free_target:.4f} bits on average, outside [{bounds[0]:g}, {bounds[1]:g}]")
    return min(max(free_target, bounds[0]), bounds[1])


def pinned_range(sizes: Mapping[str, torch.Tensor], pinned: Mapping[str, int],
                 lowest: float, highest: float) -> tuple[float, float]:
    """The overall averages reachable when the free blocks range over [lowest, highest]."""
    total = sum(int(s.sum()) for s in sizes.values())
    pinned_weights = sum(int(sizes[n].sum()) for n in pinned)
    pinned_bits = sum(b * int(sizes[n].sum()) for n, b in pinned.items())
    free = total - pinned_weights
    return ((lowest * free + pinned_bits) / total, (highest * free + pinned_bits) / total)
