"""The serving checks without starting vLLM: `sfmp serve`'s pre-check (checksums unless
--no-verify, completeness, finite values), the plugin's own check in vLLM's start-up path, and
the model gauges computed from the tensors served."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sfmp_serve.cli import main as cli_main
from sfmp_serve.cli import serve
from sfmp_serve.errors import FormatError
from sfmp_serve.format import BitStats
from sfmp_serve.preflight import PREFLIGHT_ENV, VERIFY_ENV, check_checkpoint
from tests.corrupt import data_offset, flip_byte, resigned_copy
from tests.serving.checkpoints import make_random_checkpoint
from tests.tiny import make_tiny_model

NORM = "model.norm.weight"
QWEIGHT = "model.layers.0.mlp.down_proj.qweight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    model = make_tiny_model(root / "model", "llama", heads=3, kv_heads=1, layers=1)
    return make_random_checkpoint(model, root / "sfmp")


def flipped(checkpoint, tmp_path):
    import shutil
    bad = shutil.copytree(checkpoint, tmp_path / "flipped")
    flip_byte(bad / "model.safetensors", data_offset(bad / "model.safetensors", QWEIGHT), 0x04)
    return bad


def missing_norm(checkpoint, tmp_path):
    return resigned_copy(checkpoint, tmp_path / "no_norm", lambda t: t.pop(NORM))


def nan_norm(checkpoint, tmp_path):
    return resigned_copy(checkpoint, tmp_path / "nan_norm",
                         lambda t: t[NORM].__setitem__(1, float("nan")))


def _serve(monkeypatch, argv):
    """Exit status of `sfmp serve argv` and the environment vLLM would have got (or None)."""
    seen = {}
    monkeypatch.setattr(serve, "supervise",
                        lambda command, env, quiet=None: seen.update(env) or 0)
    monkeypatch.setattr(serve, "kv_cache_args", lambda extra, env: [])
    return cli_main.main(["serve", *argv]), (seen or None)


@pytest.mark.parametrize("damage,message", [
    (flipped, f"flipped/model.safetensors: tensor {QWEIGHT}: checksum mismatch"),
    (missing_norm, f"no_norm: tensor {NORM}: missing from the checkpoint (the "
                   "LlamaForCausalLM model of config.json has it)"),
    (nan_norm, f"nan_norm/model.safetensors: tensor {NORM}: contains NaN or Inf"),
])
def test_serve_refuses_before_vllm_starts(monkeypatch, checkpoint, tmp_path, capsys, damage,
                                          message):
    rc, env = _serve(monkeypatch, [str(damage(checkpoint, tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and env is None  # vLLM never started
    assert err[-1].startswith("sfmp serve: error: ") and message in err[-1]


def test_no_verify_skips_only_the_checksums(monkeypatch, checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        rc, env = _serve(monkeypatch, [str(flipped(checkpoint, tmp_path)), "--no-verify"])
    assert rc == 0 and "--no-verify: tensors not compared with their checksums" in caplog.text
    rc, env = _serve(monkeypatch, ["--no-verify", str(missing_norm(checkpoint, tmp_path))])
    assert rc == 2 and env is None


def test_serve_tells_the_plugin_what_it_checked(monkeypatch, checkpoint):
    rc, env = _serve(monkeypatch, [str(checkpoint)])
    assert rc == 0 and env[PREFLIGHT_ENV] == os.path.realpath(checkpoint)


def test_report_recomputes_the_bits(checkpoint):
    report = check_checkpoint(checkpoint)
    assert report.verified and report.model == "LlamaForCausalLM" and report.layers == 7
    assert "checksums verified" in report.summary()
    from sfmp_serve.format import load_checkpoint
    stats = load_checkpoint(checkpoint).bit_stats()
    assert (report.avg_bits, report.bits_per_weight) == (stats.avg_bits, stats.bits_per_weight)


# --- the plugin, as vLLM calls it (no server) ---------------------------------------------
vllm = pytest.importorskip("vllm")


def _plugin_config(path):
    from transformers import AutoConfig

    from sfmp_serve.format import load_checkpoint
    from sfmp_serve.quant_method.config import SFMPQuantConfig
    config = SFMPQuantConfig.from_config(load_checkpoint(path, verify=False,
                                                         validate=False).config.to_dict())
    return config, AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("damage,message", [
    (flipped, "checksum mismatch"), (missing_norm, f"tensor {NORM}: missing"),
    (nan_norm, f"tensor {NORM}: contains NaN or Inf")])
def test_plugin_checks_when_vllm_is_started_directly(monkeypatch, checkpoint, tmp_path, damage,
                                                     message):
    monkeypatch.delenv(PREFLIGHT_ENV, raising=False)
    bad = damage(checkpoint, tmp_path)
    config, hf_config = _plugin_config(bad)
    with pytest.raises(FormatError, match=message):
        config.maybe_update_config(str(bad), hf_config=hf_config)
    monkeypatch.setenv(PREFLIGHT_ENV, os.path.realpath(bad))  # `sfmp serve` checked it already
    config.maybe_update_config(str(bad), hf_config=hf_config)


def test_plugin_skips_checksums_with_sfmp_verify_0(monkeypatch, checkpoint, tmp_path):
    monkeypatch.delenv(PREFLIGHT_ENV, raising=False)
    bad = flipped(checkpoint, tmp_path)
    config, hf_config = _plugin_config(bad)
    monkeypatch.setenv(VERIFY_ENV, "0")
    config.maybe_update_config(str(bad), hf_config=hf_config)
    with pytest.raises(FormatError, match=f"tensor {NORM}: missing"):
        bad = missing_norm(checkpoint, tmp_path)
        config.maybe_update_config(str(bad), hf_config=hf_config)


def test_plugin_leaves_hub_names_to_vllm(caplog, checkpoint):
    config, hf_config = _plugin_config(checkpoint)
    with caplog.at_level(logging.WARNING):
        config.maybe_update_config("some-org/some-model", hf_config=hf_config)
    assert "not a local directory" in caplog.text


def test_gauges_report_the_served_tensors_not_the_config(monkeypatch):
    """The config says 3.0 average bits; the gauges show what the loaded layers hold."""
    from prometheus_client import REGISTRY
    from vllm.model_executor.layers.linear import LinearBase

    from sfmp_serve.quant_method import linear_method
    from sfmp_serve.quant_method.config import SFMPQuantConfig
    from tests.serving.packed import random_packed, sfmp_config

    class FakeLinear(LinearBase):
        """A LinearBase without vLLM's distributed set-up: only what the method touches."""

        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.params_dtype = torch.float32

    monkeypatch.setattr(linear_method, "_served", BitStats(0, 0, 0))
    name = "model.layers.0.mlp.down_proj"
    config = SFMPQuantConfig.from_config(sfmp_config((name,)).to_dict())  # avg_bits 3.0
    method = config.get_quant_method(FakeLinear(), name)
    layer = FakeLinear()
    method.create_weights(layer, 64, [48], 64, 48, torch.float32)
    shard = random_packed(48, 64, sfmp_config(bit_choices=(4,)),  # all 4-bit blocks
                          torch.Generator().manual_seed(5))
    for suffix in ("qweight", "alpha", "beta", "block_bits", "block_offsets", "input_perm",
                   "output_perm"):
        getattr(layer, suffix).weight_loader(getattr(layer, suffix), getattr(shard, suffix))
    method.process_weights_after_loading(layer)
    stats = BitStats.of([shard], sfmp_config())
    assert stats.avg_bits == 4.0
    assert REGISTRY.get_sample_value("sfmp_model_avg_bits") == pytest.approx(stats.avg_bits)
    assert REGISTRY.get_sample_value("sfmp_model_bits_per_weight") == pytest.approx(
        stats.bits_per_weight)
