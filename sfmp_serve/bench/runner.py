"""Closed-loop load generation: at each concurrency level, C workers keep C requests in flight.

Every level sends the same prompts (so levels are comparable) and its wall time runs from the
first request sent to the last answer received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from sfmp_serve.bench.client import RequestResult, completion_payload, stream_completion
from sfmp_serve.bench.prompts import Prompt
from sfmp_serve.bench.stats import LevelSummary, summarize
from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """One sweep. `base_url` is the server root (http://host:port), without /v1."""

    base_url: str
    model: str | None
    concurrencies: tuple[int, ...]
    prompts: tuple[Prompt, ...]
    output_len: int
    input_len: int | None = None  # None: prompts from a file, lengths vary
    label: str | None = None
    timeout_s: float = 600.0
    progress: bool = True


@dataclass
class BenchResult:
    """A whole sweep: the model actually served, the settings and one summary per level."""

    url: str
    model: str
    num_prompts: int
    output_len: int
    input_len: int | None = None
    label: str | None = None
    levels: list[LevelSummary] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"url": self.url, "model": self.model, "label": self.label,
                "num_prompts": self.num_prompts, "input_len": self.input_len,
                "output_len": self.output_len,
                "levels": [lv.to_dict() for lv in self.levels]}


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model id listed by GET /v1/models (what `--model` defaults to)."""
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url) as response:
            if response.status != 200:
                raise SFMPError(f"GET {url} answered HTTP {response.status}")
            models = (await response.json()).get("data") or []
    except (aiohttp.ClientError, TimeoutError) as e:
        raise SFMPError(f"cannot reach {url}: {e}") from e
    except ValueError as e:  # not JSON: not an OpenAI-compatible server
        raise SFMPError(f"GET {url} did not answer JSON: {e}") from e
    if not models:
        raise SFMPError(f"GET {url} lists no model; pass --model")
    return str(models[0]["id"])


async def run_level(session: aiohttp.ClientSession, config: BenchConfig, model: str,
                    concurrency: int) -> LevelSummary:
    """Send every prompt once with at most `concurrency` requests in flight."""
    url = f"{config.base_url}/v1/completions"
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for prompt in config.prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    bar = tqdm(total=len(config.prompts), desc=f"concurrency {concurrency}", unit="req",
               disable=not config.progress, leave=False)

    async def worker() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            payload = completion_payload(model, prompt, config.output_len)
            result = await stream_completion(session, url, payload)
            if not result.ok:
                log.debug("request failed: %s", result.error)
            results.append(result)
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - start
    bar.close()
    return summarize(concurrency, results, duration)


async def run_sweep(config: BenchConfig) -> BenchResult:
    """Run every concurrency level in order against one server."""
    if not config.concurrencies or min(config.concurrencies) < 1:
        raise SFMPError(f"--concurrency needs positive integers, got {config.concurrencies}")
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    # One connection per in-flight request: the pool must not cap the concurrency under test.
    connector = aiohttp.TCPConnector(limit=max(config.concurrencies))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = config.model or await served_model(session, config.base_url)
        result = BenchResult(url=config.base_url, model=model,
                             num_prompts=len(config.prompts), output_len=config.output_len,
                             input_len=config.input_len, label=config.label)
        for concurrency in config.concurrencies:
            level = await run_level(session, config, model, concurrency)
            log.info("concurrency %d: %d/%d completed, %.1f output tok/s", concurrency,
                     level.completed, level.requests, level.output_throughput)
            result.levels.append(level)
    return result
