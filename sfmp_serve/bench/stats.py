"""Summaries of one concurrency level: throughput, latency percentiles, errors."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from sfmp_serve.bench.client import RequestResult

PERCENTILES = (50, 95, 99)


@dataclass
class LevelSummary:
    """Results at one concurrency level. Latencies in milliseconds, rates per second.

    `itl_*` are gaps between streamed chunks (what a reader sees); `tpot_ms_mean` is the mean
    over requests of (latency - TTFT) / (completion_tokens - 1), which differs from ITL when
    a server sends several tokens per chunk.
    """

    concurrency: int
    requests: int
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    input_throughput: float
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    tpot_ms_mean: float
    error_kinds: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles_ms(values_s: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of `values_s` (seconds) in milliseconds; NaN when empty."""
    if not values_s:
        return {**{f"p{p}": float("nan") for p in PERCENTILES}, "mean": float("nan")}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def _error_kind(message: str) -> str:
    # Group errors by what precedes the details ("HTTP 500", "ClientConnectorError"), so a
    # flood of identical failures stays one readable line.
    return message.split(":", 1)[0][:80]


def summarize(concurrency: int, results: list[RequestResult], duration_s: float) -> LevelSummary:
    """Aggregate the per-request results of one level run over `duration_s` wall seconds."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    completion_tokens = sum(r.completion_tokens for r in done)
    tpots = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
             for r in done if r.completion_tokens > 1]
    span = max(duration_s, 1e-9)
    return LevelSummary(
        concurrency=concurrency,
        requests=len(results),
        completed=len(done),
        errors=len(failed),
        duration_s=duration_s,
        request_throughput=len(done) / span,
        output_throughput=completion_tokens / span,
        input_throughput=prompt_tokens / span,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_ms=percentiles_ms([r.ttft_s for r in done]),
        itl_ms=percentiles_ms([gap for r in done for gap in r.itl_s]),
        e2e_ms=percentiles_ms([r.latency_s for r in done]),
        tpot_ms_mean=float(np.mean(tpots) * 1000.0) if tpots else float("nan"),
        error_kinds=dict(Counter(_error_kind(r.error or "unknown") for r in failed)),
    )
