"""Salience: per-sequence squared gradients of the LM loss, summed, for decoder linears only."""

import pytest
import torch

from offline.model_io import load_model
from offline.salience import fisher_diagonal, resolve_device
from sfmp_serve.errors import SFMPError


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama)


def test_fisher_equals_sum_of_per_sequence_squared_gradients(loaded):
    tokens = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(loaded.model, loaded.targets, tokens)
    assert set(fisher) == set(loaded.targets.targets)
    names = list(loaded.targets.targets)[:3]
    weights = [loaded.model.get_submodule(n).weight for n in names]
    expected = [torch.zeros_like(w) for w in weights]
    for seq in tokens:
        for w in weights:
            w.requires_grad_(True)
        loss = loaded.model(input_ids=seq[None], labels=seq[None]).loss
        for e, g in zip(expected, torch.autograd.grad(loss, weights)):
            e += g ** 2
    for name, e in zip(names, expected):
        assert fisher[name].dtype == torch.float32 and fisher[name].device.type == "cpu"
        assert torch.allclose(fisher[name], e, rtol=1e-4, atol=1e-12)
        assert (fisher[name] > 0).any()
    # gradients were only enabled for the pass, and nothing is left behind
    assert all(p.grad is None for p in loaded.model.parameters())


def test_nan_salience_names_the_layer(tiny_llama):
    fresh = load_model(tiny_llama)
    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        fresh.model.get_submodule(name).weight[0, 0] = float("inf")
    with pytest.raises(SFMPError, match=r"salience of model\.layers\.\d\..* NaN or Inf"):
        fisher_diagonal(fresh.model, fresh.targets, torch.randint(3, 300, (1, 8)))


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(SFMPError, match="--device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SFMPError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_fisher_matches_cpu(tiny_llama):
    tokens = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    cpu = load_model(tiny_llama)
    expected = fisher_diagonal(cpu.model, cpu.targets, tokens)
    gpu = load_model(tiny_llama)
    gpu.model.to("cuda")
    got = fisher_diagonal(gpu.model, gpu.targets, tokens, "cuda")
    for name, e in expected.items():
        assert got[name].device.type == "cpu"
        assert torch.allclose(got[name], e, rtol=1e-3, atol=1e-9 * float(e.max())), name
