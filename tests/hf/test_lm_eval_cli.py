"""`sfmp eval lm-eval` on the transformers path: a local task scored as a direct computation
scores it, and bad input refused in one line before any model loads. An SFMP checkpoint through
sfmp_serve.hf and through a real vLLM server: tests/serving/test_lm_eval.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfmp_serve.cli.main import main
from tests.lm_eval_task import DOCS, TASK, read_samples, write_task

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm_eval"))


def direct_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """Each choice's log-likelihood after its context, written out: lm-eval's encoding of a
    multiple-choice request is the context, then " " + the choice as the continuation."""
    out = []
    for context, choices, _ in DOCS:
        ctx = tokenizer(context)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(context + " " + choice)["input_ids"]
            assert whole[:len(ctx)] == ctx  # the continuation starts on a token boundary
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        out.append(scores)
    return out


def _lm_eval(capsys, *args: str) -> dict:
    assert main(["eval", "lm-eval", *args, "--tasks", TASK, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])[TASK]


def test_plain_model_scores_as_computed_directly(tiny_llama, task_dir, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    got = _lm_eval(capsys, str(tiny_llama), "--include-path", str(task_dir),
                   "--samples", str(samples))
    want = direct_loglikelihoods(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
                                 AutoTokenizer.from_pretrained(tiny_llama))
    scored = read_samples(samples)
    assert sorted(scored) == list(range(len(DOCS)))
    for doc_id, scores in scored.items():
        assert scores == pytest.approx(want[doc_id], abs=1e-3)
    accuracy = sum(max(range(3), key=s.__getitem__) == label
                   for s, (_, _, label) in zip(want, DOCS)) / len(DOCS)
    assert got["acc,none"] == pytest.approx(accuracy) and got["sample_len"] == len(DOCS)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "task 'no_such_task_xyz': not one of lm-eval's tasks"),
    (["--tasks", TASK, "--include-path", "/nonexistent/tasks"],
     "--include-path /nonexistent/tasks: not a directory"),
    (["--tasks", " , "], "--tasks: give at least one task name"),
    (["--tasks", TASK, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--tasks", TASK, "--limit", "0"], "--limit 0: must be positive"),
])
def test_bad_input_is_one_line(tiny_llama, args, message, capsys):
    assert main(["eval", "lm-eval", str(tiny_llama), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_task_whose_data_is_missing_is_named(tiny_llama, tmp_path, capsys):
    tasks = write_task(tmp_path)
    (tmp_path / "docs.jsonl").unlink()
    assert main(["eval", "lm-eval", str(tiny_llama), "--tasks", TASK, "--include-path",
                 str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"task '{TASK}': cannot load its data" in err


def test_needs_a_model_or_a_server(capsys):
    assert main(["eval", "lm-eval", "--tasks", TASK]) == 2
    assert "give MODEL_OR_CKPT or --server URL" in capsys.readouterr().err
