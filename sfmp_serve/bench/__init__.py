"""`sfmp bench`: an async load generator for OpenAI-compatible /v1/completions servers.

prompts -> client (one streamed, timed request) -> runner (concurrency levels) -> stats
(percentiles, throughput) -> report (table, JSON, plot).
"""

from sfmp_serve.bench.runner import BenchConfig, BenchResult, run_sweep
from sfmp_serve.bench.stats import LevelSummary

__all__ = ["BenchConfig", "BenchResult", "LevelSummary", "run_sweep"]
