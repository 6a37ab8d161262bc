"""Presenting a sweep: a text table, strict JSON, and a throughput/latency plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sfmp_serve.errors import SFMPError

COLUMNS = ("conc", "done", "err", "req/s", "out tok/s", "TTFT p50", "p95", "p99",
           "ITL p50", "p95", "p99", "E2E p50")


def _clean(value):
    # NaN (no successful request) is not JSON; null says "not measured" plainly.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(result: dict) -> str:
    """`result` (BenchResult.to_dict()) as strict JSON, NaN written as null."""
    return json.dumps(_clean(result), indent=2, allow_nan=False)


def load_json(path: str | Path) -> dict:
    """A result written by `sfmp bench --json`, for overlaying in a plot."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SFMPError(f"cannot read bench result {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
        raise SFMPError(f"{path} is not an `sfmp bench --json` result (no 'levels' list)")
    return data


def format_table(result: dict) -> str:
    """Fixed-width table, one row per concurrency level; latencies in ms."""
    inputs = f"{result['input_len']} input, " if result.get("input_len") else ""
    head = (f"model {result['model']} at {result['url']}: {result['num_prompts']} requests per "
            f"level, {inputs}{result['output_len']} output tokens each (latencies in ms)")
    rows = [COLUMNS]
    for lv in result["levels"]:
        t, i, e = lv["ttft_ms"], lv["itl_ms"], lv["e2e_ms"]
        rows.append((str(lv["concurrency"]), str(lv["completed"]), str(lv["errors"]),
                     f"{lv['request_throughput']:.2f}", f"{lv['output_throughput']:.1f}",
                     *(_ms(t[k]) for k in ("p50", "p95", "p99")),
                     *(_ms(i[k]) for k in ("p50", "p95", "p99")), _ms(e["p50"])))
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    errors = [f"  c={lv['concurrency']}: {kind} x{n}" for lv in result["levels"]
              for kind, n in lv["error_kinds"].items()]
    return "\n".join([head, *lines, *(["errors:", *errors] if errors else [])])


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    # Sub-10 ms latencies (ITL on small models) need the extra digit to be readable.
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _label(result: dict) -> str:
    return result.get("label") or result["model"]


def plot(results: list[dict], path: str | Path) -> None:
    """Throughput, TTFT and ITL against concurrency, one line per result (sweep)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("output tokens/s", lambda lv: [lv["output_throughput"]], ("",)),
              ("TTFT (ms)", lambda lv: [lv["ttft_ms"]["p50"], lv["ttft_ms"]["p95"]],
               (" p50", " p95")),
              ("inter-token latency (ms)", lambda lv: [lv["itl_ms"]["p50"], lv["itl_ms"]["p95"]],
               (" p50", " p95")))
    for ax, (title, values, suffixes) in zip(axes, panels):
        for k, result in enumerate(results):
            conc = [lv["concurrency"] for lv in result["levels"]]
            series = list(zip(*(values(lv) for lv in result["levels"])))
            for series_k, suffix, style in zip(series, suffixes, ("-o", "--s")):
                ys = [float("nan") if y is None else y for y in series_k]
                ax.plot(conc, ys, style, color=f"C{k}", label=_label(result) + suffix)
        ax.set_xscale("log", base=2)
        ticks = sorted({lv["concurrency"] for r in results for lv in r["levels"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    first = results[0]
    inputs = f"{first['input_len']} input, " if first.get("input_len") else ""
    fig.suptitle(f"sfmp bench: {first['num_prompts']} requests per level, "
                 f"{inputs}{first['output_len']} output tokens each")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise SFMPError(f"cannot write plot {path}: {e.strerror}") from e
    finally:
        plt.close(fig)
