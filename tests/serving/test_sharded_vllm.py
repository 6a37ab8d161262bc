"""A sharded checkpoint with overrides (some linears left unquantized, others pinned) loads in
transformers, and vLLM's CPU server (one start, --enforce-eager) answers as transformers does.
"""

from __future__ import annotations

import sys

import pytest
import torch

from sfmp_serve.cli.main import main
from sfmp_serve.format import load_checkpoint
from tests.procs import Proc, free_port, request
from tests.tiny import make_family_model

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")

PROMPT = [283, 307, 297, 294, 293, 285, 296, 120, 45, 201, 33, 34, 35, 36]
VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "128",
             "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "4",
             "--enforce-eager"]
IGNORED = r"layers\.0\.self_attn\.[qkv]_proj"  # all of one layer vLLM fuses (qkv_proj)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = make_family_model(root / "model", "llama")
    out = root / "sfmp"
    assert main(["quantize", str(model), "--bits", "3", "--levels", "3", "--bit-choices",
                 "2,3,4", "--method", "awq", "--group-size", "32", "--block-rows", "16",
                 "--nsamples", "2", "--seqlen", "16", "--ignore", IGNORED,
                 "--pin", "down_proj=4", "--max-shard-size", "150KB", "--out", str(out)]) == 0
    return out


def test_sharded_checkpoint_loads_in_transformers(checkpoint):
    import sfmp_serve.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from sfmp_serve.hf import load_sfmp_model

    shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    assert len(shards) > 1 and (checkpoint / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(checkpoint)
    assert "model.layers.0.self_attn.q_proj" not in ckpt.config.quantized_modules
    assert all((ckpt.packed(n).block_bits == 4).all()
               for n in ckpt.config.quantized_modules if n.endswith("down_proj"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits,
                                   load_sfmp_model(checkpoint, dtype=torch.float32)(ids).logits)


def test_vllm_serves_the_sharded_checkpoint_as_transformers_does(checkpoint, tmp_path):
    from sfmp_serve.hf import load_sfmp_model

    reference = load_sfmp_model(checkpoint, dtype=torch.float32, dequantized=True)
    port = free_port()
    proc = Proc([sys.executable, "-m", "sfmp_serve.cli.main", "serve", "--verbose",
                 str(checkpoint), "--port", str(port), *VLLM_ARGS], tmp_path / "server.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/completions"
        out = request(url, {"model": "sfmp", "temperature": 0, "prompt": PROMPT,
                            "max_tokens": 6, "ignore_eos": True, "return_token_ids": True})
        scored = request(url, {"model": "sfmp", "temperature": 0, "prompt": PROMPT,
                               "max_tokens": 1, "echo": True, "logprobs": 1})
    finally:
        proc.stop()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
        logp = torch.log_softmax(reference(torch.tensor([PROMPT])).logits[0].double(), -1)
    assert out["choices"][0]["token_ids"] == ids[len(PROMPT):]
    served = scored["choices"][0]["logprobs"]["token_logprobs"][1:len(PROMPT)]
    expected = [logp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert served == pytest.approx(expected, abs=1e-2)
