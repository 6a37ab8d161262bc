"""`sfmp serve` without starting vLLM: argument handling, pre-checks, the exec'd command."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

from sfmp_serve.cli import main as cli_main
from sfmp_serve.cli import serve
from tests.serving.checkpoints import corrupt_copy, make_random_checkpoint
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_cli")
    model = make_tiny_model(root / "model", "llama", heads=3, kv_heads=1, layers=1)
    return make_random_checkpoint(model, root / "sfmp")


def _exec_args(monkeypatch, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    captured = {}

    def fake_execve(path, args, env):
        captured.update(path=path, args=args, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        cli_main.main(["serve", *argv])
    assert captured["path"] == sys.executable
    return captured["args"], captured["env"]


def test_execs_vllm_with_sfmp_and_passes_unknown_options(monkeypatch, checkpoint, tmp_path):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fresh dir lands here
    args, env = _exec_args(monkeypatch, [str(checkpoint), "--max-model-len", "256",
                                         "--port", "9123", "--dtype=float32"])
    assert args == [sys.executable, "-m", serve.VLLM_SERVER, "--model", str(checkpoint),
                    "--quantization", "sfmp", "--host", "127.0.0.1", "--port", "9123",
                    "--max-model-len", "256", "--dtype=float32"]
    metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
    assert metrics_dir.startswith(str(tmp_path))
    assert os.path.isdir(metrics_dir) and not os.listdir(metrics_dir)


def test_keeps_callers_metrics_dir(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    args, env = _exec_args(monkeypatch, ["--host", "0.0.0.0", str(checkpoint)])
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "prom")
    assert (tmp_path / "prom").is_dir()
    assert args[args.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("extra, message", [
    (["--quantization", "awq"], "option --quantization: `sfmp serve` sets it"),
    (["--model=x"], "option --model: `sfmp serve` sets it"),
    (["-tp", "2"], "option -tp 2: SFMP serving supports tensor parallel size 1 only"),
    (["--tensor-parallel-size=4"], "tensor parallel size 1 only"),
])
def test_rejects_options_it_owns_or_cannot_serve(checkpoint, capsys, extra, message):
    assert cli_main.main(["serve", str(checkpoint), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoint_is_one_line_before_vllm(tmp_path, capsys):
    assert cli_main.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint directory not found" in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "llama"}')
    assert cli_main.main(["serve", str(tmp_path / "plain")]) == 2
    assert "not an SFMP checkpoint" in capsys.readouterr().err


def test_corrupted_tensor_named_before_vllm_starts(monkeypatch, checkpoint, tmp_path, capsys):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("vLLM must not start"))
    name = "model.layers.0.self_attn.k_proj.alpha"
    bad = corrupt_copy(checkpoint, tmp_path / "bad", name,
                       lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    assert cli_main.main(["serve", str(bad)]) == 2
    assert f"layer model.layers.0.self_attn.k_proj: tensor {name}" in capsys.readouterr().err
