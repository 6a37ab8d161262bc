"""Prometheus metrics of SFMP serving. The names are a contract (deploy/grafana builds on them).

| name                        | type      | labels              | meaning                          |
|-----------------------------|-----------|---------------------|----------------------------------|
| sfmp_model_avg_bits         | gauge     | -                   | quantization_config.avg_bits:    |
|                             |           |                     | average code bits per weight     |
| sfmp_model_bits_per_weight  | gauge     | -                   | quantization_config.             |
|                             |           |                     | bits_per_weight: storage, scales |
|                             |           |                     | and tables included              |
| sfmp_quantized_weight_bytes | gauge     | -                   | resident bytes of the prepared   |
|                             |           |                     | SFMP layers (planes, scales,     |
|                             |           |                     | tables), summed over live workers|
| sfmp_op_calls_total         | counter   | path=decode|prefill | calls of the sfmp::linear op     |
| sfmp_op_seconds             | histogram | path=decode|prefill | seconds per op call, host time   |
|                             |           |                     | (on GPUs: launch time unless the |
|                             |           |                     | backend synchronises)            |

Gauges use multiprocess_mode "livemax" (model info) and "livesum" (bytes); histogram buckets
span 10 us .. 1 s.

path is "decode" for calls with at most ops.api.DECODE_MAX_M rows, else "prefill".

In vLLM the op runs in the engine-core / worker process, not in the API server. Its metrics
reach the server's /metrics only in Prometheus multiprocess mode: PROMETHEUS_MULTIPROC_DIR
must name an empty directory before any process starts (`sfmp serve` does this); vLLM's
/metrics then collects every process's files, ours included. Without that variable the metrics
live in this process's default registry (tests, the transformers path).

Metric objects are created on first use, so the multiprocess decision (taken by
prometheus_client when a metric is created) follows the environment of the process using them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

# 10 us .. ~1 s in roughly x2.5 steps: decode GEMVs sit at the low end, CPU prefill at the top.
OP_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                      2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
PATHS = ("decode", "prefill")


@dataclass
class _Metrics:
    avg_bits: Gauge
    bits_per_weight: Gauge
    weight_bytes: Gauge
    op_calls: Counter
    op_seconds: Histogram
    # Labelled children, looked up once: observe_op runs on every op call.
    by_path: dict[str, tuple] = field(default_factory=dict)


_lock = threading.Lock()
_metrics: _Metrics | None = None


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics(
                    avg_bits=Gauge("sfmp_model_avg_bits",
                                   "Average code bits of the SFMP-quantized linears",
                                   multiprocess_mode="livemax"),
                    bits_per_weight=Gauge("sfmp_model_bits_per_weight",
                                          "Storage bits per quantized weight, scales included",
                                          multiprocess_mode="livemax"),
                    weight_bytes=Gauge("sfmp_quantized_weight_bytes",
                                       "Resident bytes of prepared SFMP layers",
                                       multiprocess_mode="livesum"),
                    op_calls=Counter("sfmp_op_calls", "Calls of the sfmp::linear op",
                                     ["path"]),
                    op_seconds=Histogram("sfmp_op_seconds", "Seconds per sfmp::linear call",
                                         ["path"], buckets=OP_SECONDS_BUCKETS),
                )
                # Both label values exist from the start, so dashboards see zero, not nothing.
                for path in PATHS:
                    _metrics.by_path[path] = (_metrics.op_calls.labels(path=path),
                                              _metrics.op_seconds.labels(path=path))
    return _metrics


def set_model_info(avg_bits: float, bits_per_weight: float) -> None:
    m = _get()
    m.avg_bits.set(avg_bits)
    m.bits_per_weight.set(bits_per_weight)


def add_weight_bytes(delta: int) -> None:
    _get().weight_bytes.inc(delta)


def observe_op(path: str, seconds: float) -> None:
    calls, op_seconds = _get().by_path[path]
    calls.inc()
    op_seconds.observe(seconds)
