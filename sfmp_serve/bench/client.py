"""One streamed request to an OpenAI-compatible /v1/completions endpoint, timed.

Timing comes from the server-sent events: TTFT is the time from sending the request to the
first event that carries a choice; inter-token latencies are the gaps between later events
with a choice. Token counts come only from the `usage` object the server appends when asked
with `stream_options.include_usage`; a stream that ends without it is an error, since a
guessed count would make the throughput numbers meaningless.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from sfmp_serve.bench.prompts import Prompt


@dataclass
class RequestResult:
    """What one request measured; `error` is None on success."""

    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def completion_payload(model: str, prompt: Prompt, output_len: int) -> dict:
    """Request body: exactly `output_len` generated tokens (ignore_eos is a vLLM extension)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _events(line: bytes) -> dict | None:
    """Parse one SSE line into its JSON payload; None for keep-alives and `[DONE]`."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:"):].strip()
    if data == "[DONE]":
        return None
    return json.loads(data)


async def _read_stream(response: aiohttp.ClientResponse, start: float) -> RequestResult:
    result = RequestResult(ok=False)
    last_token_at: float | None = None
    usage: dict | None = None
    async for line in response.content:
        event = _events(line)
        if event is None:
            continue
        if "error" in event:  # vLLM reports mid-stream failures as an error event
            result.error = f"server error in stream: {event['error']}"
            return result
        now = time.perf_counter()
        if event.get("choices"):
            if last_token_at is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last_token_at)
            last_token_at = now
        if event.get("usage"):
            usage = event["usage"]
    result.latency_s = time.perf_counter() - start
    if usage is None:
        result.error = "stream ended without usage (server ignored stream_options.include_usage)"
        return result
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    result.ok = last_token_at is not None
    if not result.ok:
        result.error = "stream carried no tokens"
    return result


async def stream_completion(session: aiohttp.ClientSession, url: str,
                            payload: dict) -> RequestResult:
    """POST `payload` with streaming and time it; network and HTTP failures become errors."""
    start = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                body = (await response.text())[:200].replace("\n", " ")
                return RequestResult(ok=False, latency_s=time.perf_counter() - start,
                                     error=f"HTTP {response.status}: {body}")
            return await _read_stream(response, start)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return RequestResult(ok=False, latency_s=time.perf_counter() - start,
                             error=f"{type(e).__name__}: {e}")
