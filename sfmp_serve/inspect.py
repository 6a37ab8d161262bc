"""What an SFMP checkpoint holds: bit-widths, storage cost, sizes, and a heatmap of block bits.

All numbers are recomputed from the (validated) tensors, not copied from quantization_config:
avg_bits = code bits per quantized weight (blocks weighted by their size); bits_per_weight
adds alpha/beta, the bit and offset tables and the permutations (PackedLinear.stored_bits).
With `verify`, the checkpoint is first checked as `sfmp serve` checks it (sfmp_serve.preflight:
checksums, completeness against the model of config.json).
size_bytes is the size of the *.safetensors files on disk; original_size_bytes is the same
model unquantized: every floating tensor (quantized linears at [out, in]) in the act dtype.
A mixture-of-experts checkpoint (linears named <block>.experts.<e>.<projection>) also gets
the average bits of every expert (its projections together) per sparse block: a table in
the report, `expert_bits` in the JSON and a layer x expert panel in the heatmap.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfmp_serve.format import Checkpoint, LayerGeometry, load_checkpoint
from sfmp_serve.preflight import checked_checkpoint


# <sparse block>.experts.<expert index>.<projection>, as checkpoints name expert linears
_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")


@dataclass
class LinearBits:
    name: str
    geometry: LayerGeometry
    block_bits: torch.Tensor  # uint8 [n_block_rows, n_groups]

    @property
    def layer_type(self) -> str:
        """The projection name; "experts.<projection>" for a routed expert's (so Qwen3-MoE's
        dense gate_proj and its experts' gate_proj are counted apart)."""
        match = _EXPERT.match(self.name)
        return f"experts.{match['proj']}" if match else self.name.rpartition(".")[2]

    def weights_per_bits(self) -> dict[int, int]:
        sizes = self.geometry.rows()[:, None] * self.geometry.cols()[None, :]
        bits = self.block_bits.to(torch.int64)
        return {int(b): int(sizes[bits == b].sum()) for b in bits.unique()}


@dataclass
class CheckpointSummary:
    path: Path
    act_dtype: str
    group_size: int
    block_rows: int
    bit_choices: tuple[int, ...]
    quantized_weights: int
    avg_bits: float
    bits_per_weight: float
    size_bytes: int
    original_size_bytes: int
    # layer type (module name suffix) -> bit-width -> number of weights
    histogram: dict[str, dict[int, int]] = field(default_factory=dict)
    linears: list[LinearBits] = field(default_factory=list)
    verified: str | None = None  # what --verify checked, None without it
    # sparse block -> expert index -> average bits of that expert's projections
    expert_bits: dict[str, dict[int, float]] = field(default_factory=dict)
    tp_shards: int = 1  # serves at every tensor parallel size dividing it

    def to_json(self) -> dict:
        return {
            "path": str(self.path), "act_dtype": self.act_dtype,
            "group_size": self.group_size, "block_rows": self.block_rows,
            "bit_choices": list(self.bit_choices), "quantized_linears": len(self.linears),
            "quantized_weights": self.quantized_weights, "avg_bits": self.avg_bits,
            "bits_per_weight": self.bits_per_weight, "size_bytes": self.size_bytes,
            "original_size_bytes": self.original_size_bytes,
            "compression": self.original_size_bytes / self.size_bytes,
            "bit_histogram": {t: {str(b): n for b, n in sorted(h.items())}
                              for t, h in self.histogram.items()},
            "verified": self.verified is not None, "tp_shards": self.tp_shards,
            "expert_bits": {block: {str(e): bits for e, bits in experts.items()}
                            for block, experts in self.expert_bits.items()},
        }


def expert_bits(linears: list[LinearBits]) -> dict[str, dict[int, float]]:
    """Average code bits of every routed expert (weights of its projections together), per
    sparse block, blocks and experts in natural order; empty for a dense model."""
    totals: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for lb in linears:
        match = _EXPERT.match(lb.name)
        if match:
            acc = totals[match["block"]][int(match["expert"])]
            for bits, count in lb.weights_per_bits().items():
                acc[0] += bits * count
                acc[1] += count
    return {block: {e: bits / n for e, (bits, n) in sorted(experts.items())}
            for block, experts in sorted(totals.items(), key=lambda kv: _natural_key(kv[0]))}


def _original_size(ckpt: Checkpoint) -> int:
    elt = ckpt.config.torch_act_dtype.itemsize
    quantized = set(ckpt.config.quantized_modules)
    total = 0
    for key, t in ckpt.tensors.items():
        owner = key.rpartition(".")[0]
        if owner in quantized and not key.endswith(".bias"):
            continue  # counted below as one dense [out, in] weight
        total += t.numel() * (elt if t.is_floating_point() else t.element_size())
    for name in quantized:
        p = ckpt.packed(name)
        total += p.out_features * p.in_features * elt
    return total


def summarize(path: str | os.PathLike, verify: bool = False) -> CheckpointSummary:
    """Validate the checkpoint at `path` and summarise it (raises SFMPError when broken).
    verify: also every checksum and every parameter of the model (the serving pre-check)."""
    verified = None
    if verify:
        ckpt, report = checked_checkpoint(path, verify=True)
        verified = report.summary()
    else:
        ckpt = load_checkpoint(path, verify=False)
    cfg = ckpt.config
    linears, histogram = [], defaultdict(lambda: defaultdict(int))
    for name in cfg.quantized_modules:
        packed = ckpt.packed(name)
        lb = LinearBits(name, packed.geometry(cfg), packed.block_bits)
        linears.append(lb)
        for bits, count in lb.weights_per_bits().items():
            histogram[lb.layer_type][bits] += count
    stats = ckpt.bit_stats()
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return CheckpointSummary(
        Path(path), cfg.act_dtype, cfg.group_size, cfg.block_rows, cfg.bit_choices,
        stats.weights, stats.avg_bits, stats.bits_per_weight, size, _original_size(ckpt),
        {t: dict(h) for t, h in histogram.items()}, linears, verified, expert_bits(linears),
        cfg.tp_shards)


def format_summary(s: CheckpointSummary) -> str:
    """The human-readable report `sfmp inspect` prints."""
    mb = 1e6
    lines = [
        f"checkpoint   {s.path}",
        f"quantized    {len(s.linears)} linears, {s.quantized_weights:,} weights; blocks "
        f"{s.block_rows} rows x {s.group_size} inputs; bit choices "
        f"{', '.join(map(str, s.bit_choices))}",
        f"avg bits     {s.avg_bits:.3f} (code bits per weight)",
        f"bits/weight  {s.bits_per_weight:.3f} (incl. scales, bit/offset tables, permutations)",
        f"tensor par.  serves at tensor parallel sizes dividing {s.tp_shards} (--tp-shards)",
        f"size         {s.size_bytes / mb:.2f} MB on disk vs {s.original_size_bytes / mb:.2f} MB "
        f"unquantized ({s.act_dtype}): {s.original_size_bytes / s.size_bytes:.2f}x smaller",
        "bit-widths per layer type (share of its weights):",
    ]
    if s.verified:
        lines.insert(1, f"verified     {s.verified}")
    bits = sorted({b for h in s.histogram.values() for b in h})
    width = max([12] + [len(t) + 2 for t in s.histogram])
    lines.append("  " + "type".ljust(width) + "".join(f"{b}-bit".rjust(8) for b in bits)
                 + "avg".rjust(8))
    for layer_type, h in s.histogram.items():
        total = sum(h.values())
        shares = "".join(f"{100 * h.get(b, 0) / total:7.1f}%" for b in bits)
        avg = sum(b * n for b, n in h.items()) / total
        lines.append("  " + layer_type.ljust(width) + shares + f"{avg:8.3f}")
    lines += format_expert_bits(s.expert_bits)
    return "\n".join(lines)


def format_expert_bits(blocks: dict[str, dict[int, float]], per_line: int = 16) -> list[str]:
    """The per-expert panel: one row per sparse block (wrapped every `per_line` experts)."""
    if not blocks:
        return []
    lines = ["average bits per expert (its projections together):"]
    width = max(len(b) for b in blocks)
    for block, experts in blocks.items():
        ids = list(experts)
        for start in range(0, len(ids), per_line):
            chunk = ids[start:start + per_line]
            head = block if start == 0 else ""
            lines.append("  " + head.ljust(width) + "".join(f"{e:>6}" for e in chunk))
            lines.append("  " + "".ljust(width) + "".join(f"{experts[e]:6.2f}" for e in chunk))
    return lines


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plot_block_bits(summary: CheckpointSummary, out_png: str | os.PathLike) -> Path:
    """Heatmap of every linear's block bit-widths: one column per layer type, layers stacked.

    Blocks are drawn at their true extent (ragged edges included), x = reordered input index,
    y = reordered output row, layers top to bottom; thin white lines separate layers.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    by_type: dict[str, list[LinearBits]] = defaultdict(list)  # types in checkpoint order
    for lb in summary.linears:
        by_type[lb.layer_type].append(lb)
    for items in by_type.values():
        items.sort(key=lambda lb: _natural_key(lb.name))
    choices = sorted(set(summary.bit_choices))
    cmap = ListedColormap(plt.get_cmap("viridis")(torch.linspace(0, 1, len(choices)).numpy()))
    norm = BoundaryNorm([b - 0.5 for b in choices] + [choices[-1] + 0.5], len(choices))
    panels = len(by_type) + bool(summary.expert_bits)
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels + 1.5, 9), squeeze=False)
    for ax, (layer_type, items) in zip(axes[0], by_type.items()):
        mesh = _draw_type(ax, items, cmap, norm)
        ax.set_title(layer_type, fontsize=10)
        ax.set_xlabel("input (reordered)", fontsize=8)
    axes[0][0].set_ylabel("layer (rows reordered within each)", fontsize=8)
    if summary.expert_bits:
        _draw_experts(axes[0][-1], summary.expert_bits, choices)
    cbar = fig.colorbar(mesh, ax=axes[0].tolist(), ticks=choices, fraction=0.02, pad=0.02)
    cbar.set_label("bits")
    fig.suptitle(f"SFMP block bit-widths: {summary.path.name}  (avg {summary.avg_bits:.3f} bits,"
                 f" {summary.bits_per_weight:.3f} BPW)", fontsize=11)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_type(ax, items: list[LinearBits], cmap, norm):
    """Stack the linears of one type vertically; returns the last mesh (for the colorbar)."""
    y0, ticks, labels, mesh = 0, [], [], None
    for lb in items:
        geo = lb.geometry
        xs = torch.cat([torch.zeros(1, dtype=torch.int64), geo.cols().cumsum(0)]).numpy()
        ys = y0 + torch.cat([torch.zeros(1, dtype=torch.int64), geo.rows().cumsum(0)]).numpy()
        mesh = ax.pcolormesh(xs, ys, lb.block_bits.numpy(), cmap=cmap, norm=norm)
        ax.axhline(y0, color="white", linewidth=0.8)
        ticks.append(y0 + geo.out_features / 2)
        labels.append(re.findall(r"\d+", lb.name)[0] if re.search(r"\d", lb.name) else lb.name)
        y0 += geo.out_features
    step = max(1, len(items) // 15)  # at most ~15 labels per column stay readable
    ax.set_yticks(ticks[::step], labels[::step], fontsize=7)
    ax.set_ylim(y0, 0)  # first layer on top
    ax.tick_params(axis="x", labelsize=7)
    return mesh


def _draw_experts(ax, blocks: dict[str, dict[int, float]], choices: list[int]) -> None:
    """The per-expert panel: sparse blocks down, experts across, colour = average bits."""
    n = max(max(experts) + 1 for experts in blocks.values())
    grid = torch.full((len(blocks), n), float("nan"))
    for row, experts in enumerate(blocks.values()):
        for e, bits in experts.items():
            grid[row, e] = bits
    ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=choices[0], vmax=choices[-1],
              interpolation="nearest")
    labels = [re.findall(r"\d+", b)[0] if re.search(r"\d", b) else b for b in blocks]
    step = max(1, len(labels) // 15)
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
    ax.set_title("experts (avg bits)", fontsize=10)
    ax.set_xlabel("expert", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
