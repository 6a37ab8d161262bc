"""Mixture-of-experts serving through vLLM's compiled path: a tiny Mixtral quantized with GPTQ
on routed calibration text, with one expert that no calibration token reached (quantized with
RTN, at the lowest width), served WITHOUT --enforce-eager, so the expert loop runs inside
the sfmp::moe_experts op under torch.compile. Completions and prompt log-probabilities equal
the transformers path on the same checkpoint. (Every family, eagerly:
tests/serving/test_families_vllm.py.)"""

from __future__ import annotations


import pytest
import torch

from tests.procs import request, serving
from tests.tiny import CORPUS, make_family_model, starve_expert

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")

PROMPTS = [[283, 307, 297, 294, 293, 285, 296, 120, 45, 201, 33, 34, 35, 36],
           [5, 77, 150, 9, 31]]  # two lengths in one batch: different routing per request
VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "128",
             "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, transformers reference) for a GPTQ Mixtral whose expert 3 is never routed to."""
    from offline.pipeline import QuantizeOptions, quantize_model, save_result
    from sfmp_serve.hf import load_sfmp_model

    root = tmp_path_factory.mktemp("moe")
    model_dir = starve_expert(make_family_model(root / "model", "mixtral"), 3)
    calib = root / "calib.txt"
    calib.write_text(" ".join(CORPUS))
    options = QuantizeOptions(bits=3.0, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=32, block_rows=16, nsamples=4, seqlen=64,
                              method="gptq", calib=str(calib))
    ckpt = save_result(quantize_model(model_dir, options), model_dir, root / "sfmp")
    reference = load_sfmp_model(ckpt, dtype=torch.float32, dequantized=True)
    with serving(ckpt, root / "server.log", *VLLM_ARGS) as url:
        yield url, reference


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def test_batched_greedy_completions_are_the_references(served):
    url, reference = served
    out = request(f"{url}/v1/completions", {"model": "sfmp", "temperature": 0,
                                            "prompt": PROMPTS, "max_tokens": 6,
                                            "ignore_eos": True, "return_token_ids": True})
    got = {c["index"]: c["token_ids"] for c in out["choices"]}
    for i, prompt in enumerate(PROMPTS):
        assert got[i] == _greedy(reference, prompt, 6), i


def test_prompt_logprobs_match_the_reference(served):
    url, reference = served
    prompt = PROMPTS[0]
    out = request(f"{url}/v1/completions", {"model": "sfmp", "temperature": 0,
                                            "prompt": prompt, "max_tokens": 1, "echo": True,
                                            "logprobs": 1})
    served_logprobs = out["choices"][0]["logprobs"]["token_logprobs"][1:len(prompt)]
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].double(), -1)
    expected = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert served_logprobs == pytest.approx(expected, abs=1e-2)
