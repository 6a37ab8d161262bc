"""End to end: `sfmp serve` on a tiny SFMP checkpoint, the real vLLM (CPU build) OpenAI server.

ONE server for the module, started WITHOUT --enforce-eager (vLLM's default torch.compile), in
float32 like the transformers reference it is compared with.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sfmp_serve.format import load_checkpoint
from tests.procs import Proc, free_port, request

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")  # these tests start vLLM's server

PROMPT = [283, 307, 297, 294, 293, 285, 296, 120, 45, 201]  # token ids: no tokenizer drift
VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "256",
             "--kv-cache-memory-bytes", str(128 << 20), "--max-num-seqs", "32"]


@pytest.fixture(scope="module")
def checkpoint(serving_checkpoint) -> Path:
    return serving_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # --verbose: vLLM's own output in `log`, whose tail a failed start shows
    proc = Proc([sys.executable, "-m", "sfmp_serve.cli.main", "serve", "--verbose",
                 str(checkpoint), "--port", str(port), *VLLM_ARGS], log)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The transformers model with every SFMP linear dequantized by the reference op, float32
    (independent of the CPU op that both vLLM and SFMPLinear run)."""
    from sfmp_serve.hf import load_sfmp_model
    return load_sfmp_model(checkpoint, dtype=torch.float32, dequantized=True)


def _complete(url: str, **body) -> dict:
    return request(f"{url}/v1/completions", {"model": "sfmp", "temperature": 0, **body})


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def test_greedy_completion_matches_reference(server, reference):
    url, _ = server
    out = _complete(url, prompt=PROMPT, max_tokens=16, ignore_eos=True, return_token_ids=True)
    assert out["choices"][0]["token_ids"] == _greedy(reference, PROMPT, 16)


def test_prompt_logprobs_match_reference(server, reference):
    url, _ = server
    out = _complete(url, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    served = out["choices"][0]["logprobs"]["token_logprobs"][1:len(PROMPT)]
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([PROMPT])).logits[0].double(), -1)
    expected = [logp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert served == pytest.approx(expected, abs=1e-2)


def test_chat_completion_answers(server):
    url, _ = server
    out = request(f"{url}/v1/chat/completions",
                  {"model": "sfmp", "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert out["usage"]["completion_tokens"] >= 1


def test_32_concurrent_requests(server):
    url, _ = server
    prompts = [PROMPT[: 3 + i % 7] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda p: _complete(url, prompt=p, max_tokens=8, ignore_eos=True,
                                                 temperature=0.8, seed=1), prompts))
    assert [o["usage"]["completion_tokens"] for o in outs] == [8] * 32


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = request(f"{url}/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_vllm_and_sfmp_after_traffic(server, checkpoint):
    url, _ = server
    _complete(url, prompt=PROMPT * 3, max_tokens=4, ignore_eos=True)  # a prefill and decodes
    samples = _samples(url)

    def total(name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))

    config = load_checkpoint(checkpoint, validate=False).config
    assert total("vllm:generation_tokens_total") > 0
    assert total("sfmp_op_calls_total", path="decode") > 0
    assert total("sfmp_op_calls_total", path="prefill") > 0
    assert total("sfmp_op_seconds_count", path="decode") > 0
    assert total("sfmp_op_seconds_sum", path="prefill") > 0
    assert total("sfmp_quantized_weight_bytes") > 0
    assert total("sfmp_model_avg_bits") == pytest.approx(config.avg_bits)
    assert total("sfmp_model_bits_per_weight") == pytest.approx(config.bits_per_weight)
