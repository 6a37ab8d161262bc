"""End to end: a corrupted tensor stops vLLM's start-up with the layer and the tensor named
(the plugin's check at load; `sfmp serve`'s pre-check is in test_serve_cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.serving.checkpoints import corrupt_copy
from tests.procs import Proc, free_port
from tests.serving.test_vllm_server import VLLM_ARGS

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")  # these tests start vLLM's server


@pytest.fixture(scope="module")
def checkpoint(serving_checkpoint) -> Path:
    return serving_checkpoint


def test_vllm_startup_fails_on_corrupted_tensor(checkpoint, tmp_path):
    """The plugin's own validation inside vLLM (without `sfmp serve`'s pre-check), with the
    method detected from config.json (no --quantization flag)."""
    name = "model.layers.0.mlp.up_proj.qweight"
    bad = corrupt_copy(checkpoint, tmp_path / "bad", name, lambda t: t[:-1].clone())
    proc = Proc([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(bad), "--port", str(free_port()),
                 "--enforce-eager", *VLLM_ARGS], tmp_path / "vllm.log")
    assert proc.wait_exit() != 0
    output = proc.output()
    assert f"layer model.layers.0.mlp.up_proj: tensor {name}" in output, output[-3000:]
