"""Family self-test, serving half: vLLM's CPU server loads an SFMP checkpoint of a tiny random
model of each family and answers completions as transformers does with the same weights.

One server start per family of sfmp_serve.arch, its last-listed model_type (module-scoped,
--enforce-eager: start-up without torch.compile's warm-up; the compiled path is
tests/serving/test_vllm_server.py's, on a tiny Llama): Qwen3, Gemma 3, Phi-3 today.
SFMP_SERVE_ALL_FAMILIES=1 serves every model_type of the table instead (about 30 s each on
two cores; docs/model-families.md records such a run). The prompt is longer than the Gemma
models' sliding window (8), so both attention kinds count.
"""

from __future__ import annotations

import os

import pytest
import torch

from sfmp_serve.arch import ARCHITECTURES
from tests.procs import request, serving
from tests.tiny import make_family_model

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")

ONE_PER_FAMILY = [spec.model_types[-1] for spec in ARCHITECTURES]
SERVED = ([t for spec in ARCHITECTURES for t in spec.model_types]
          if os.environ.get("SFMP_SERVE_ALL_FAMILIES") == "1" else ONE_PER_FAMILY)
PROMPT = [283, 307, 297, 294, 293, 285, 296, 120, 45, 201, 33, 34, 35, 36]
VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "128",
             "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "4",
             "--enforce-eager"]


@pytest.fixture(scope="module", params=SERVED)
def served(request, tmp_path_factory):
    """(url, reference transformers model) for one family's AWQ checkpoint."""
    from offline.pipeline import QuantizeOptions, quantize_model, save_result
    from sfmp_serve.hf import load_sfmp_model

    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_family_model(root / "model", request.param)
    options = QuantizeOptions(bits=3.0, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=32, block_rows=16, nsamples=2, seqlen=16,
                              method="awq")
    ckpt = save_result(quantize_model(model_dir, options), model_dir, root / "sfmp")
    reference = load_sfmp_model(ckpt, dtype=torch.float32, dequantized=True)
    with serving(ckpt, root / "server.log", *VLLM_ARGS) as url:
        yield url, reference


def _complete(url: str, **body) -> dict:
    return request(f"{url}/v1/completions", {"model": "sfmp", "temperature": 0, **body})


def test_completion_is_the_references_greedy_continuation(served):
    url, reference = served
    out = _complete(url, prompt=PROMPT, max_tokens=6, ignore_eos=True, return_token_ids=True)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out["choices"][0]["token_ids"] == ids[len(PROMPT):]


def test_prompt_logprobs_match_the_reference(served):
    url, reference = served
    out = _complete(url, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    served_logprobs = out["choices"][0]["logprobs"]["token_logprobs"][1:len(PROMPT)]
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([PROMPT])).logits[0].double(), -1)
    expected = [logp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert served_logprobs == pytest.approx(expected, abs=1e-2)
