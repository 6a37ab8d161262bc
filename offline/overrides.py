"""Per-linear overrides: which quantization targets are left unquantized (`--ignore`) and which
get a fixed bit-width (`--pin`), resolved once against the model's TargetSet.

Patterns are regular expressions searched in the full linear name (re.search, so `down_proj`
matches every layer's and `^model\\.layers\\.0\\.` only layer 0's). Mistakes fail before any
work, naming the pattern: a pattern that matches no target (embeddings and lm_head are never
quantized, so matching them is no override), a linear both ignored and pinned or pinned to two
widths, and an ignore that splits linears vLLM fuses into one layer (q/k/v, gate/up, the
experts of a sparse block: vLLM serves a fused layer with one method, so they are quantized all
or none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from offline.targets import TargetSet
from sfmp_serve.errors import SFMPError


@dataclass(frozen=True)
class Selection:
    """The targets that get quantized (model order) and the pinned widths among them."""

    quantized: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    pinned: dict[str, int] = field(default_factory=dict)

    @property
    def free(self) -> tuple[str, ...]:
        """Quantized targets whose bits the allocation chooses."""
        return tuple(n for n in self.quantized if n not in self.pinned)


def _matching(targets: TargetSet, pattern: str, flag: str) -> list[str]:
    regex = re.compile(pattern)
    names = [t.name for t in targets if regex.search(t.name)]
    if not names:
        example = next(iter(targets)).name
        raise SFMPError(f"{flag} {pattern!r}: matches none of the {len(targets)} quantized "
                        f"linears (full names such as {example}; embeddings and lm_head are "
                        "never quantized)")
    return names


def _check_fused(targets: TargetSet, ignored: set[str]) -> None:
    """An ignore may not split a layer vLLM fuses (it serves all of it one way), nor the
    experts of a sparse block (vLLM's FusedMoE layer holds them all)."""
    for index in sorted({t.layer for t in targets}):
        prefix = targets.layer_prefix(index)
        experts = [t.name for t in targets if t.layer == index and t.expert is not None]
        hit = [n for n in experts if n in ignored]
        if hit and len(hit) != len(experts):
            rest = next(n for n in experts if n not in ignored)
            raise SFMPError(f"--ignore: {hit[0]} is ignored but {rest} not: vLLM serves the "
                            f"experts of layer {index} as one layer; ignore all or none of them")
        for fused, members in targets.spec.fused.items():
            names = [f"{prefix}.{m}" for m in members if f"{prefix}.{m}" in targets]
            hit = [n for n in names if n in ignored]
            if hit and len(hit) != len(names):
                rest = [n.rpartition(".")[2] for n in names if n not in ignored]
                raise SFMPError(f"--ignore: {hit[0]} is ignored but {', '.join(rest)} not: vLLM "
                                f"fuses them into one layer ({prefix}.{fused}); ignore all or "
                                "none of them")


def select(targets: TargetSet, ignore: Sequence[str] = (),
           pins: Sequence[tuple[str, int]] = ()) -> Selection:
    """Apply the overrides to `targets`; SFMPError naming the pattern for every mistake."""
    ignored: set[str] = set()
    for pattern in ignore:
        ignored.update(_matching(targets, pattern, "--ignore"))
    _check_fused(targets, ignored)
    pinned: dict[str, int] = {}
    source: dict[str, str] = {}
    for pattern, bits in pins:
        for name in _matching(targets, pattern, "--pin"):
            if name in ignored:
                raise SFMPError(f"--pin {pattern}={bits}: {name} is also ignored (--ignore); "
                                "a linear is either left unquantized or pinned")
            if name in pinned and pinned[name] != bits:
                raise SFMPError(f"--pin {pattern}={bits}: {name} is already pinned to "
                                f"{pinned[name]} bits by --pin {source[name]}")
            pinned[name], source[name] = bits, f"{pattern}={bits}"
    quantized = tuple(t.name for t in targets if t.name not in ignored)
    if not quantized:
        raise SFMPError("--ignore: every linear is ignored; nothing is left to quantize")
    return Selection(quantized, tuple(t.name for t in targets if t.name in ignored),
                     {n: pinned[n] for n in quantized if n in pinned})
