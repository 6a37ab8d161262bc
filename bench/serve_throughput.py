"""Serving benchmark: a dense model vs SFMP checkpoints on vLLM's OpenAI server, side by side.

    .venv/bin/python bench/serve_throughput.py \\
        --model bf16=models/smollm2-bf16 \\
        --model "SFMP 3.5 BPW=runs/smollm2-w3.25" --model "SFMP 4.0 BPW=runs/smollm2-w3.75"

Every server is started first (`sfmp serve` for SFMP checkpoints, vLLM's server otherwise,
PROMETHEUS_MULTIPROC_DIR fresh, one port each) and stays up; then --repeats rounds each run
the whole sweep against every server in turn, so all models see the same machine (on shared
cores, load from elsewhere comes and goes). Each sweep streams random-token prompts at every
concurrency (decode tokens/s per request = 1 / TPOT, aggregate output tokens/s, TTFT); the
table gives the median over the rounds and the ratio of every model to the first. Also read:
the worker's resident memory and the sfmp_quantized_weight_bytes gauge, perplexity through the
server (echo + logprobs) and through transformers (sfmp_serve.hf for SFMP). Writes everything,
every round included, as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors import safe_open

from sfmp_serve.arch import arch_for
from sfmp_serve.bench.prompts import random_token_prompts
from sfmp_serve.bench.runner import BenchConfig, run_sweep
from sfmp_serve.eval.hf_ppl import hf_perplexity, load_model_and_tokenizer
from sfmp_serve.eval.server_ppl import server_perplexity
from sfmp_serve.eval.windows import read_text, tokenize_windows
from sfmp_serve.format import is_sfmp_checkpoint, read_hf_config

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


class Server:
    """One server in its own process group, killed as a whole."""

    def __init__(self, model: str, port: int, vllm_args: list[str], log: Path) -> None:
        if is_sfmp_checkpoint(model):  # --verbose: vLLM's own output into this log too
            cmd = [sys.executable, "-m", "sfmp_serve.cli.main", "serve", model, "--verbose"]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-prom-")}
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*cmd, "--port", str(port), *vllm_args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log}")
            try:
                _get(f"{self.url}/health")
                return time.monotonic() - start
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"server not up after {timeout} s; see {self.log}")

    def worker_rss_bytes(self) -> int | None:
        """VmRSS of the process that holds the weights (vLLM's worker, else engine core)."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.proc.pid:  # process group
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
                rss = next(int(line.split()[1]) * 1024
                           for line in (stat.parent / "status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
            except (OSError, StopIteration, IndexError, ValueError):
                continue
            for role in ("Worker", "EngineCore"):
                if role in cmd:
                    found[role] = rss
        return found.get("Worker", found.get("EngineCore"))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(30)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def linear_weight_bytes(model_dir: str) -> int:
    """Bytes of the dense decoder linears of a plain checkpoint (what SFMP replaces)."""
    spec = arch_for(read_hf_config(model_dir)["model_type"])
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                if any(key.endswith(f".{lin}.weight") for lin in spec.linears):
                    shape = handle.get_slice(key).get_shape()
                    total += torch.Size(shape).numel() * 2  # bf16
    return total


def sfmp_gauge(url: str) -> float | None:
    for line in _get(f"{url}/metrics").splitlines():
        if line.startswith("sfmp_quantized_weight_bytes "):
            return float(line.split()[1])
    return None


def median_levels(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency, the median over rounds of the numbers the tables show."""
    out = []
    for levels in zip(*rounds):
        out.append({"concurrency": levels[0]["concurrency"],
                    "tpot_ms_mean": statistics.median(lv["tpot_ms_mean"] for lv in levels),
                    "output_throughput": statistics.median(lv["output_throughput"]
                                                           for lv in levels),
                    "ttft_ms": {"p50": statistics.median(lv["ttft_ms"]["p50"] for lv in levels)},
                    "errors": sum(lv["errors"] for lv in levels)})
    return out


def bench_models(models: list[list[str]], args: argparse.Namespace, windows) -> list[dict]:
    servers: list[tuple[str, str, Server]] = []
    results = []
    try:
        for i, (label, model) in enumerate(models):
            log = Path(args.log_dir) / f"{label.replace(' ', '_').replace('/', '_')}.log"
            print(f"== starting {label}: {model} (log {log})", file=sys.stderr, flush=True)
            server = Server(model, args.port + i, args.vllm_args, log)
            servers.append((label, model, server))
            server.startup_s = server.wait(args.start_timeout)
        prompts = tuple(random_token_prompts(args.num_prompts, args.input_len, seed=0))
        for label, _, server in servers:  # warm-up
            asyncio.run(run_sweep(BenchConfig(server.url, None, (1,), prompts[:1], 8,
                                              args.input_len, label, progress=False)))
        rounds: dict[str, list[list[dict]]] = {label: [] for label, _, _ in servers}
        for r in range(args.repeats):
            for label, _, server in servers:
                sweep = asyncio.run(run_sweep(BenchConfig(
                    server.url, None, tuple(args.concurrency), prompts, args.output_len,
                    args.input_len, label, progress=False)))
                rounds[label].append([lv.to_dict() for lv in sweep.levels])
                print(f"round {r + 1}/{args.repeats} {label}: " + ", ".join(
                    f"@{lv.concurrency} {lv.output_throughput:.1f} tok/s"
                    for lv in sweep.levels) + f" (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
        for label, model, server in servers:
            result = {"label": label, "model": model, "startup_s": server.startup_s,
                      "rounds": rounds[label], "levels": median_levels(rounds[label]),
                      "worker_rss_bytes": server.worker_rss_bytes(),
                      "sfmp_weight_bytes": sfmp_gauge(server.url)}
            if windows:
                result["ppl_server"] = server_perplexity(server.url, windows, args.ppl_seqlen,
                                                         progress=False).ppl
            results.append(result)
    finally:
        for _, _, server in servers:
            server.stop()
    for result in results:
        result["dense_linear_bytes"] = (None if is_sfmp_checkpoint(result["model"])
                                        else linear_weight_bytes(result["model"]))
        if windows and not args.no_hf_ppl:
            hf_model, _ = load_model_and_tokenizer(result["model"], dtype=torch.bfloat16)
            result["ppl_hf"] = hf_perplexity(hf_model, windows, args.ppl_seqlen,
                                             progress=False).ppl
    return results


def ratio_table(results: list[dict]) -> str:
    """Every model against the first, per concurrency (medians over the rounds)."""
    base = {lv["concurrency"]: lv for lv in results[0]["levels"]}
    lines = ["| model | concurrency | output tok/s | vs " + results[0]["label"]
             + " | decode tok/s per request | vs " + results[0]["label"] + " |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for lv in r["levels"]:
            b = base[lv["concurrency"]]
            lines.append(f"| {r['label']} | {lv['concurrency']} | {lv['output_throughput']:.1f} | "
                         f"{lv['output_throughput'] / b['output_throughput']:.2f}x | "
                         f"{1000 / lv['tpot_ms_mean']:.1f} | "
                         f"{b['tpot_ms_mean'] / lv['tpot_ms_mean']:.2f}x |")
    return "\n".join(lines)


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def table(results: list[dict]) -> str:
    levels = sorted({lv["concurrency"] for r in results for lv in r["levels"]})
    head = ["model"]
    for c in levels:
        head += [f"decode tok/s/req @{c}", f"output tok/s @{c}", f"TTFT p50 ms @{c}"]
    head += ["linear weights MiB", "worker RSS MiB", "ppl server", "ppl HF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["label"]]
        by_c = {lv["concurrency"]: lv for lv in r["levels"]}
        for c in levels:
            lv = by_c.get(c)
            tpot = lv and lv["tpot_ms_mean"]
            row += [_fmt(1000 / tpot if tpot else None), _fmt(lv and lv["output_throughput"]),
                    _fmt(lv and lv["ttft_ms"]["p50"], digits=0)]
        weights = r["sfmp_weight_bytes"] or r["dense_linear_bytes"]
        row += [_fmt(weights, 2**20), _fmt(r["worker_rss_bytes"], 2**20, 0),
                _fmt(r.get("ppl_server"), digits=3), _fmt(r.get("ppl_hf"), digits=3)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options after -- go to the server, e.g. "
                                       "-- --max-num-seqs 8")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=DIR")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="rounds over every server")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ppl-text", default=DEFAULT_TEXT, help="'' to skip perplexity")
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--ppl-max-tokens", type=int, default=4096)
    p.add_argument("--no-hf-ppl", action="store_true")
    p.add_argument("--port", type=int, default=18700)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--log-dir", default=tempfile.gettempdir())
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("vllm_args", nargs="*", default=[])
    args = p.parse_args(argv)
    args.vllm_args = args.vllm_args or ["--dtype", "bfloat16", "--max-model-len", "1024",
                                        "--kv-cache-memory-bytes", str(1 << 30)]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = [m.split("=", 1) for m in args.model]
    windows = None
    if args.ppl_text:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(models[0][1])
        windows = tokenize_windows(tokenizer, read_text(args.ppl_text), args.ppl_seqlen,
                                   args.ppl_max_tokens)
    results = bench_models(models, args, windows)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(table(results))
    print()
    print(ratio_table(results))


if __name__ == "__main__":
    main()
