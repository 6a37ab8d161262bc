"""Acceptance: a real `sfmp serve` of a tiny SFMP checkpoint, a real Prometheus scraping it,
`sfmp bench` driving load, then every dashboard query evaluated on the live data, and the
bench's request and token counts checked against the server's own counters.

One server and one Prometheus for the whole module (the server takes about a minute to start
on two cores); both are killed in teardown whatever happens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.procs import prom_query, scrape, start_prometheus
from tests.procs import Proc, free_port
from tests.deploy.test_deploy_files import dashboard_exprs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SERVER_START_S = 300
BENCH_ARGS = ["--concurrency", "1,4", "--num-prompts", "6", "--input-len", "24",
              "--output-len", "8", "--seed", "0", "--json"]
COUNTERS = ("vllm:request_success_total", "vllm:generation_tokens_total",
            "vllm:prompt_tokens_total")


def _checkpoint(workdir: Path) -> tuple[Path, float, float]:
    """A tiny Llama quantized by the real pipeline; returns (dir, avg_bits, bits_per_weight)."""
    from offline.pipeline import QuantizeOptions, quantize_model, save_result
    from tests.tiny import make_tiny_model

    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not the default tiny's 24.
    model = make_tiny_model(workdir / "tiny", "llama", heads=3, kv_heads=1)
    options = QuantizeOptions(bits=3.25, budget_gb=None, group_size=32, block_rows=16,
                              nsamples=4, seqlen=64)  # GPTQ (the default) needs a token per column
    result = quantize_model(model, options)
    out = save_result(result, model, workdir / "sfmp")
    return out, result.config.avg_bits, result.config.bits_per_weight


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    workdir = tmp_path_factory.mktemp("observability")
    ckpt, avg_bits, bpw = _checkpoint(workdir)
    port = free_port()
    # `sfmp serve` makes its own fresh metrics dir and, given no KV-cache size, picks one that
    # fits this machine; --verbose: vLLM's output in server.log, as the images run it;
    # --enforce-eager skips torch.compile's warm-up (tens of seconds here), and the metrics do
    # not depend on it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "VLLM_CPU_KVCACHE_SPACE")}
    server = Proc([sys.executable, "-m", "sfmp_serve.cli.main", "serve", "--verbose", str(ckpt),
                   "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
                   "--enforce-eager"],
                  workdir / "server.log", env=env)
    procs = [server]
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_http(f"{url}/health", SERVER_START_S)
        prometheus, prom_url = start_prometheus(f"127.0.0.1:{port}", workdir)
        procs.append(prometheus)
        # A first scrape before any traffic: rate() needs a sample from before the load.
        _wait_for(lambda: prom_query(prom_url, 'up{job="sfmp"} == 1')
                  and prom_query(prom_url, "vllm:generation_tokens_total"), "first scrape")
        yield {"url": url, "prom": prom_url, "avg_bits": avg_bits, "bpw": bpw}
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def bench_run(stack):
    """`sfmp bench` (the real CLI, in a subprocess) with the server's counters before it."""
    before = scrape(stack["url"])
    proc = subprocess.run([sys.executable, "-m", "sfmp_serve.cli.main", "bench",
                           "--url", stack["url"], *BENCH_ARGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return before, json.loads(proc.stdout)


def test_bench_counts_equal_server_counters(stack, bench_run):
    before, result = bench_run
    levels = result["levels"]
    assert all(lv["errors"] == 0 for lv in levels), [lv["error_kinds"] for lv in levels]
    expected = {"vllm:request_success_total": sum(lv["completed"] for lv in levels),
                "vllm:generation_tokens_total": sum(lv["completion_tokens"] for lv in levels),
                "vllm:prompt_tokens_total": sum(lv["prompt_tokens"] for lv in levels)}
    assert expected["vllm:request_success_total"] == 2 * 6
    assert expected["vllm:generation_tokens_total"] == 2 * 6 * 8  # ignore_eos + max_tokens
    assert expected["vllm:prompt_tokens_total"] == 2 * 6 * 24  # token-id prompts, exact

    def deltas():
        after = scrape(stack["url"])
        return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS}

    # The server records a request's stats as it finishes; allow it a moment to settle.
    _wait_for(lambda: deltas() == expected, "server counters to match", timeout_s=15,
              allow_timeout=True)
    assert deltas() == expected


def test_every_dashboard_query_returns_data(stack, bench_run):
    prom = stack["prom"]
    final = scrape(stack["url"])["vllm:request_success_total"]
    # Wait for a scrape taken after the load, so every rate() window contains it.
    _wait_for(lambda: any(float(r["value"][1]) == final for r in
                          prom_query(prom, "sum(vllm:request_success_total)")),
              "Prometheus to scrape the finished load")
    # A series first exported in that scrape (a handler/status pair, a path) needs one more
    # sample before rate() over it has a value: give Prometheus a few more scrapes.
    _wait_for(lambda: all(prom_query(prom, expr) for expr in dashboard_exprs()),
              "every dashboard query to have data", timeout_s=20, allow_timeout=True)
    empty, not_finite = [], []
    for expr in dashboard_exprs():
        result = prom_query(prom, expr)
        if not result:
            empty.append(expr)
        elif not all(math.isfinite(float(r["value"][1])) for r in result):
            not_finite.append((expr, [r["value"][1] for r in result]))
    assert not empty, f"queries without data: {empty}"
    assert not not_finite, f"queries with NaN/Inf: {not_finite}"


def test_sfmp_metrics_describe_the_checkpoint(stack, bench_run):
    prom = stack["prom"]

    def value(expr: str) -> float:
        return float(prom_query(prom, expr)[0]["value"][1])

    assert value("max(sfmp_model_avg_bits)") == pytest.approx(stack["avg_bits"], rel=1e-6)
    assert value("max(sfmp_model_bits_per_weight)") == pytest.approx(stack["bpw"], rel=1e-6)
    assert value("max(sfmp_quantized_weight_bytes)") > 0
    calls = {r["metric"]["path"]: float(r["value"][1])
             for r in prom_query(prom, "sum by (path) (sfmp_op_calls_total)")}
    # 24-token prompts run the prefill path, batched decode steps the decode path.
    assert calls.get("decode", 0) > 0 and calls.get("prefill", 0) > 0, calls


def _wait_for(check, what: str, timeout_s: float = 30.0, allow_timeout: bool = False):
    """Poll `check` until it is truthy; on timeout raise, or return None if allowed (the
    caller then asserts with a message that shows the values)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    if allow_timeout:
        return None
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
