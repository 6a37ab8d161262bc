"""The acceptance check with the real offline pipeline: in-memory result == saved checkpoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfmp_serve.hf import load_sfmp_model, quantize_in_memory

pipeline = pytest.importorskip("offline.pipeline")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_in_memory_equals_saved(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    options = pipeline.QuantizeOptions(bits=3.0, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                                       group_size=32, block_rows=16, nsamples=4, seqlen=64)
    result = pipeline.quantize_model(model_dir, options)
    ckpt = pipeline.save_result(result, model_dir, tmp_path / "ckpt")
    in_memory = quantize_in_memory(AutoModelForCausalLM.from_pretrained(model_dir),
                                   result.packed, result.config)
    loaded = load_sfmp_model(ckpt)
    ids = torch.tensor([[0, 9, 31, 77, 150, 220, 301, 5]])
    with torch.no_grad():
        want, got = in_memory(ids).logits, loaded(ids).logits
    assert torch.equal(got, want)
    bits = torch.cat([p.block_bits.flatten() for p in result.packed.values()])
    assert set(bits.tolist()) == {2, 3, 4}  # every bit-width is exercised
