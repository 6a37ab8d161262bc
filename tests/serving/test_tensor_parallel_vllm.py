"""Tensor and pipeline parallelism through vLLM's own engine on the CPU: one checkpoint
quantized with --tp-shards 2, served at TP 1, TP 2 and PP 2 (two worker processes each, their
OpenMP threads bound to one core each by `sfmp serve`). Greedy completions are the same tokens
and prompt logprobs agree within float32 summation-order noise: each TP rank loads only its
ranges and returns partial sums for o_proj / down_proj that vLLM's all-reduce adds up.

The model: a tiny GQA Llama (6 heads of 32, 2 KV heads; widths 192 and 320, not multiples of
128), quantized by the default pipeline (GPTQ, perturbation policy, two levels).
"""

from __future__ import annotations

import pytest

from tests.procs import request, serving
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")

PROMPTS = [[283, 307, 297, 294, 293, 285, 296, 120, 45, 201, 33],
           [5, 61, 300, 17, 222, 48, 90]]
VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "128",
             "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "4"]
# --enforce-eager skips start-up warm-up (compile time); vLLM 0.32's CPU runner allocates a
# later pipeline stage's input buffers only in that warm-up, so PP runs the compiled path.
LAYOUTS = {"tp1": ["--enforce-eager"], "tp2": ["--tensor-parallel-size", "2", "--enforce-eager"],
           "pp2": ["--pipeline-parallel-size", "2"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from offline.pipeline import QuantizeOptions, quantize_model, save_result

    root = tmp_path_factory.mktemp("tp")
    model = make_tiny_model(root / "model", "llama", hidden=192, intermediate=320, heads=6,
                            kv_heads=2, layers=2)
    options = QuantizeOptions(bits=3.5, budget_gb=None, group_size=32, block_rows=16,
                              nsamples=6, seqlen=64, tp_shards=2)
    result = quantize_model(model, options)
    assert result.config.tp_shards == 2
    return save_result(result, model, root / "sfmp")


@pytest.fixture(scope="module")
def answers(checkpoint, tmp_path_factory):
    """Per layout: for each prompt, (greedy token ids, prompt logprobs)."""
    logs = tmp_path_factory.mktemp("logs")
    out = {}
    for layout, args in LAYOUTS.items():
        with serving(checkpoint, logs / f"{layout}.log", *VLLM_ARGS, *args) as url:
            out[layout] = [_answer(url, prompt) for prompt in PROMPTS]
    return out


def _answer(url: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    body = {"model": "sfmp", "temperature": 0, "prompt": prompt, "max_tokens": 6,
            "ignore_eos": True, "return_token_ids": True, "echo": True, "logprobs": 1}
    choice = request(f"{url}/v1/completions", body)["choices"][0]
    return (choice["token_ids"][-6:],
            choice["logprobs"]["token_logprobs"][1:len(prompt)])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_server_answers_as_the_single_rank_one(answers, layout):
    for (ids, logprobs), (ids1, logprobs1) in zip(answers[layout], answers["tp1"]):
        assert ids == ids1
        assert logprobs == pytest.approx(logprobs1, abs=1e-4)


def test_tensor_parallel_size_not_dividing_the_shards_is_one_line(checkpoint, capsys):
    from sfmp_serve.cli import main as cli_main

    assert cli_main.main(["serve", str(checkpoint), "--tensor-parallel-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "tensor parallel size 4 does not divide the checkpoint's tp_shards=2" in err
