"""Perplexity through an OpenAI-compatible server (vLLM), on the same windows as the HF path.

Request shape (as lm-eval's local-completions): POST /v1/completions with the window's token
ids as the prompt, echo=true, logprobs=1, max_tokens=1, temperature=0. The response's
`token_logprobs` starts with the prompt's: None for position 0, then one per prompt token.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from sfmp_serve.errors import SFMPError, one_line
from sfmp_serve.eval.windows import PplResult, check_window, scored_tokens

log = logging.getLogger(__name__)


def api_base(url: str) -> str:
    """http://host:port[/v1][/] -> http://host:port/v1"""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _request(url: str, payload: dict | None, timeout: float) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:300]
        raise SFMPError(f"{url}: HTTP {e.code}: {body}") from e
    except (urllib.error.URLError, OSError) as e:
        raise SFMPError(f"{url}: cannot reach the server ({e})") from e


def served_models(url: str, timeout: float = 30) -> list[dict]:
    """The model cards the server lists under /v1/models (at least one)."""
    data = _request(api_base(url) + "/models", None, timeout).get("data") or []
    if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
        raise SFMPError(f"{api_base(url)}/models: unexpected response (no list of models)")
    if not data:
        raise SFMPError(f"{api_base(url)}/models: the server lists no model")
    return data


def served_model(url: str, timeout: float = 30) -> str:
    """The first model the server lists under /v1/models."""
    return served_models(url, timeout)[0]["id"]


def window_nll_server(url: str, model: str, ids: list[int], timeout: float) -> float:
    payload = {"model": model, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1,
               "temperature": 0.0}
    try:
        choice = _request(api_base(url) + "/completions", payload, timeout)["choices"][0]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise SFMPError(f"{api_base(url)}/completions: unexpected response ({one_line(e)})") \
            from e
    prompt = logprobs[1:len(ids)]
    if len(logprobs) < len(ids) or any(not isinstance(lp, (int, float)) for lp in prompt):
        raise SFMPError(f"{api_base(url)}/completions: no prompt log-probabilities in the "
                        f"response (the server must support echo=true with logprobs)")
    return -float(sum(prompt))


def server_perplexity(url: str, windows: list[list[int]], seqlen: int, model: str | None = None,
                      concurrency: int = 4, timeout: float = 600,
                      progress: bool = True) -> PplResult:
    """Perplexity of the served model on `windows`, `concurrency` requests in flight."""
    model = model or served_model(url)
    nll = 0.0
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = pool.map(lambda w: window_nll_server(url, model, w, timeout), windows)
        for i, value in enumerate(tqdm(futures, total=len(windows), desc="ppl (server)",
                                       unit="window", disable=not progress)):
            nll += check_window(i, windows, value)
    return PplResult.from_nll(nll, scored_tokens(windows), seqlen, len(windows))


def tokenizer_source(url: str, model: str | None, tokenizer: str | None) -> str:
    """Where to load the tokenizer for the server path: --tokenizer, else a local model name.

    vLLM names a model served from a directory by its path, so on the same machine the served
    name is usually a directory holding the tokenizer.
    """
    if tokenizer:
        return tokenizer
    name = model or served_model(url)
    if (Path(name) / "config.json").is_file() or (Path(name) / "tokenizer.json").is_file():
        return name
    raise SFMPError(f"served model '{name}' is not a local directory: pass --tokenizer DIR "
                    f"(the model's tokenizer, needed to cut the text into the same windows)")
