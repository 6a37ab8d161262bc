"""End to end: a damaged checkpoint stops vLLM's start-up with the file, layer and tensor named
(the plugin's own checks when vLLM is started directly, without `sfmp serve`'s pre-check;
which is tested in test_serve_cli.py and test_preflight.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.procs import Proc, free_port
from tests.serving.checkpoints import corrupt_copy
from tests.serving.test_vllm_server import VLLM_ARGS

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")  # these tests start vLLM's server

UP = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def checkpoint(serving_checkpoint) -> Path:
    return serving_checkpoint


def _fails_naming(path: Path, log: Path, message: str) -> None:
    """vLLM on `path`, the method detected from config.json (no --quantization flag)."""
    proc = Proc([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(path), "--port", str(free_port()), "--enforce-eager", *VLLM_ARGS], log)
    assert proc.wait_exit() != 0
    output = proc.output()
    assert message in output, output[-3000:]


def test_vllm_startup_fails_on_corrupted_tensor(checkpoint, tmp_path):
    bad = corrupt_copy(checkpoint, tmp_path / "bad", f"{UP}.qweight", lambda t: t[:-1].clone())
    _fails_naming(bad, tmp_path / "vllm.log", f"layer {UP}: tensor {UP}.qweight")


def test_vllm_startup_fails_on_missing_norm(checkpoint, tmp_path):
    """vLLM's loader would start without it (no completeness check for quantized models) and
    serve garbage."""
    from tests.corrupt import resigned_copy
    bad = resigned_copy(checkpoint, tmp_path / "bad", lambda t: t.pop("model.norm.weight"))
    _fails_naming(bad, tmp_path / "vllm.log",
                  "tensor model.norm.weight: missing from the checkpoint")
