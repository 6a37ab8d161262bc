"""End to end: lm-eval on a tiny local task gives the same accuracy, and the same log-likelihood
for every choice, through the transformers path (`sfmp eval lm-eval CKPT`, sfmp_serve.hf) and
through a real vLLM CPU server (`sfmp eval lm-eval --server URL`, lm-eval's local-completions).

ONE server for the module, started by a quiet `sfmp serve` (the default): what its terminal
shows is checked here too. --enforce-eager: the scores do not depend on torch.compile, whose
warm-up would double the start-up time. float32 on both paths, like test_vllm_server.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sfmp_serve.cli.main import main
from tests.lm_eval_task import DOCS, TASK, read_samples, write_task
from tests.procs import Proc, free_port

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")  # these tests start vLLM's server
pytest.importorskip("lm_eval")

VLLM_ARGS = ["--served-model-name", "sfmp", "--dtype", "float32", "--max-model-len", "256",
             "--kv-cache-memory-bytes", str(128 << 20), "--max-num-seqs", "8",
             "--enforce-eager"]


@pytest.fixture(scope="module")
def checkpoint(serving_checkpoint) -> Path:
    return serving_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """(url, the terminal output of `sfmp serve` so far, vLLM's log file)."""
    root = tmp_path_factory.mktemp("lm_eval_server")
    port = free_port()
    vllm_log = root / "vllm.log"
    proc = Proc([sys.executable, "-m", "sfmp_serve.cli.main", "serve", str(checkpoint),
                 "--port", str(port), "--log-file", str(vllm_log), *VLLM_ARGS],
                root / "terminal.log")
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health")
        yield url, proc, vllm_log
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm_eval_task"))


def _lm_eval(capsys, samples: Path, *args: str) -> dict:
    assert main(["eval", "lm-eval", *args, "--tasks", TASK, "--json", "--samples",
                 str(samples)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])[TASK]


def test_same_accuracy_through_transformers_and_the_server(server, checkpoint, task_dir,
                                                          tmp_path, capsys):
    url, _, _ = server
    hf = _lm_eval(capsys, tmp_path / "hf.jsonl", str(checkpoint), "--include-path",
                  str(task_dir))
    served = _lm_eval(capsys, tmp_path / "served.jsonl", "--server", url, "--tokenizer",
                      str(checkpoint), "--include-path", str(task_dir))
    assert hf["sample_len"] == served["sample_len"] == len(DOCS)
    assert served["acc,none"] == hf["acc,none"]
    hf_scores, served_scores = read_samples(tmp_path / "hf.jsonl"), read_samples(
        tmp_path / "served.jsonl")
    assert sorted(hf_scores) == sorted(served_scores) == list(range(len(DOCS)))
    for doc_id, scores in hf_scores.items():
        # per token the paths agree to ~1e-3 (test_vllm_server.py); a choice sums < 20 tokens
        assert served_scores[doc_id] == pytest.approx(scores, abs=2e-2)
    # the accuracy is the model's: neither all right nor all wrong on this task
    assert 0 < hf["acc,none"] < 1


def test_quiet_serve_shows_progress_address_and_log_path(server):
    url, proc, vllm_log = server
    terminal = proc.output()
    assert f"its log: {vllm_log}" in terminal
    assert "ready after" in terminal and f"{url} (OpenAI API under /v1" in terminal
    log = vllm_log.read_text(errors="replace")
    assert "Resolved architecture" in log and "Resolved architecture" not in terminal
    # the deprecation warnings of the entry module sfmp serve starts are silenced at the source
    assert "DeprecationWarning" not in log
