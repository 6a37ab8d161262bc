"""Row/column reordering by salience, so salient weights gather in the top-left blocks.

Input order: descending column-sum of salience, shared by every linear of an input group (they
read the same activation, so one gather serves the fused GEMM); the group's order comes from the
sum of its members' column salience. Output order: descending row-sum, per linear. A linear
cut into tensor-parallel ranges (offline/tp_plan.py) is sorted inside each range. Semantics
follow PackedLinear: reordered input j is original input input_perm[j], reordered output i is
original output output_perm[i]. Ties keep the original order (stable sort), so all-equal
salience gives the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from sfmp_serve.errors import SFMPError


@dataclass(frozen=True)
class Order:
    input_perm: torch.Tensor  # int32 [in_features]
    output_perm: torch.Tensor  # int32 [out_features]

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrix [out, in] in original order -> reordered."""
        return matrix[self.output_perm.long()][:, self.input_perm.long()]


def descending(scores: torch.Tensor, ranges: int = 1) -> torch.Tensor:
    """Indices sorting `scores` in descending order, ties by index (int32); with `ranges`,
    inside each of that many equal contiguous ranges (tensor-parallel ranges: no index
    leaves its range)."""
    per_range = scores.to(torch.float64).view(ranges, -1)
    order = torch.sort(per_range, dim=1, descending=True, stable=True).indices
    order += torch.arange(ranges)[:, None] * per_range.shape[1]
    return order.flatten().to(torch.int32)


def identity_order(out_features: int, in_features: int) -> Order:
    return Order(torch.arange(in_features, dtype=torch.int32),
                 torch.arange(out_features, dtype=torch.int32))


def salience_orders(salience: Mapping[str, torch.Tensor],
                    input_groups: Iterable[Sequence[str]],
                    ranges: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Order]:
    """One Order per linear; linears in no group get their own input order. `ranges`: the
    (row, column) tensor-parallel ranges of a linear (default one each), which its output and
    input orders stay inside."""
    ranges = ranges or {}
    input_perm: dict[str, torch.Tensor] = {}
    for group in input_groups:
        members = [name for name in group if name in salience]
        if not members:
            continue
        widths = {salience[name].shape[1] for name in members}
        if len(widths) != 1:
            raise SFMPError(f"input group {list(members)} has different input widths {widths}")
        col_sum = sum(salience[name].to(torch.float64).sum(0) for name in members)
        col_ranges = {ranges.get(name, (1, 1))[1] for name in members}
        if len(col_ranges) != 1:
            raise SFMPError(f"input group {list(members)} has different input ranges "
                            f"{col_ranges}")
        perm = descending(col_sum, col_ranges.pop())
        input_perm.update({name: perm for name in members})
    orders = {}
    for name, s in salience.items():
        rows, cols = ranges.get(name, (1, 1))
        perm_in = input_perm.get(name)
        if perm_in is None:
            perm_in = descending(s.to(torch.float64).sum(0), cols)
        orders[name] = Order(perm_in, descending(s.to(torch.float64).sum(1), rows))
    return orders
