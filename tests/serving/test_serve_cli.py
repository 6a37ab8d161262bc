"""`sfmp serve` without starting vLLM: argument handling, pre-checks, the command it runs, and
the supervision of that command (signals, exit status, metrics directory cleanup)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading

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


def _run_args(monkeypatch, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment `sfmp serve` would run vLLM with (vLLM is not started)."""
    captured = {}

    def fake_supervise(command, env, quiet=None):
        captured.update(command=command, env=dict(env),
                        metrics_listing=os.listdir(env["PROMETHEUS_MULTIPROC_DIR"]))
        return 0

    monkeypatch.setattr(serve, "supervise", fake_supervise)
    assert cli_main.main(["serve", *argv]) == 0
    return captured["command"], captured["env"], captured["metrics_listing"]


def test_runs_vllm_with_sfmp_and_passes_unknown_options(monkeypatch, checkpoint, tmp_path):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fresh dir lands here
    args, env, listing = _run_args(monkeypatch, [str(checkpoint), "--max-model-len", "256",
                                                 "--port", "9123", "--dtype=float32",
                                                 "--kv-cache-memory-bytes=1000000"])
    assert args == [sys.executable, "-m", serve.VLLM_SERVER, "--model", str(checkpoint),
                    "--quantization", "sfmp", "--host", "127.0.0.1", "--port", "9123",
                    "--max-model-len", "256", "--dtype=float32",
                    "--kv-cache-memory-bytes=1000000"]
    metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
    assert metrics_dir.startswith(str(tmp_path)) and listing == []  # fresh and empty
    assert not os.path.exists(metrics_dir)  # removed once vLLM is gone


@pytest.mark.parametrize("available, expected", [
    (64 << 30, 4 << 30),  # a quarter, at most 4 GiB
    (6 << 30, 1536 << 20),
    (512 << 20, 256 << 20),  # at least 256 MiB: vLLM then says if max-model-len does not fit
])
def test_sizes_the_cpu_kv_cache_when_nothing_does(monkeypatch, checkpoint, available, expected):
    monkeypatch.delenv(serve._KV_ENV, raising=False)
    monkeypatch.setattr(serve, "available_memory", lambda: available)
    args, _, _ = _run_args(monkeypatch, [str(checkpoint)])
    assert args[-2:] == ["--kv-cache-memory-bytes", str(expected)]


@pytest.mark.parametrize("given", [["--gpu-memory-utilization", "0.3"],
                                   ["--kv-cache-memory-bytes", "123456789"]])
def test_leaves_the_kv_cache_to_the_user_when_sized(monkeypatch, checkpoint, given):
    monkeypatch.delenv(serve._KV_ENV, raising=False)
    args, _, _ = _run_args(monkeypatch, [str(checkpoint), *given])
    assert args[-2:] == given and args.count("--kv-cache-memory-bytes") <= 1
    monkeypatch.setenv(serve._KV_ENV, "2")  # vLLM's legacy variable sizes it too
    args, _, _ = _run_args(monkeypatch, [str(checkpoint)])
    assert "--kv-cache-memory-bytes" not in args


def test_keeps_callers_metrics_dir(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    args, env, _ = _run_args(monkeypatch, ["--host", "0.0.0.0", str(checkpoint)])
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "prom")
    assert (tmp_path / "prom").is_dir()  # the caller's: created, and kept afterwards
    assert args[args.index("--host") + 1] == "0.0.0.0"


def _fake_vllm(monkeypatch, tmp_path, script: str) -> None:
    """Make `sfmp serve` run `script` (Python) in place of vLLM."""
    monkeypatch.setattr(serve, "vllm_command",
                        lambda *args: [sys.executable, "-c", script, str(tmp_path)])


def test_child_exit_status_is_returned_and_its_metrics_dir_removed(monkeypatch, checkpoint,
                                                                    tmp_path):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    _fake_vllm(monkeypatch, tmp_path, (
        "import json, os, pathlib, sys\n"
        "d = os.environ['PROMETHEUS_MULTIPROC_DIR']\n"
        "pathlib.Path(d, 'counter_1.db').write_bytes(b'x')\n"  # what vLLM's workers write
        "pathlib.Path(sys.argv[1], 'seen.json').write_text(json.dumps(d))\n"
        "sys.exit(3)\n"))
    assert cli_main.main(["serve", str(checkpoint), "--log-file", str(tmp_path / "v.log")]) == 3
    metrics_dir = json.loads((tmp_path / "seen.json").read_text())
    assert not os.path.exists(metrics_dir)


def test_sigterm_reaches_the_child_and_ends_the_command(monkeypatch, checkpoint, tmp_path):
    _fake_vllm(monkeypatch, tmp_path, (
        "import pathlib, signal, sys, time\n"
        "def bye(*_):\n"
        "    pathlib.Path(sys.argv[1], 'got_sigterm').touch(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "pathlib.Path(sys.argv[1], 'ready').touch()\n"
        "time.sleep(60)\n"))

    def terminate_when_ready():
        for _ in range(600):
            if (tmp_path / "ready").exists():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to `sfmp serve` (this process), not the child

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    killer = threading.Thread(target=terminate_when_ready)
    killer.start()
    # the child's graceful exit
    assert cli_main.main(["serve", str(checkpoint), "--log-file", str(tmp_path / "v.log")]) == 0
    killer.join()
    assert (tmp_path / "got_sigterm").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("extra, message", [
    (["--quantization", "awq"], "option --quantization: `sfmp serve` sets it"),
    (["--model=x"], "option --model: `sfmp serve` sets it"),
    (["-tp", "2"], "tensor parallel size 2 does not divide the checkpoint's tp_shards=1"),
    (["--tensor-parallel-size=x"], "option --tensor-parallel-size 'x': expected a positive "
                                   "integer"),
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
