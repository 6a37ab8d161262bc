"""EleutherAI's lm-evaluation-harness over an SFMP checkpoint, a plain model, or a server.

The transformers path loads the model as `sfmp eval ppl` does (an SFMP checkpoint through
sfmp_serve.hf, its linears dequantized once unless `packed`) and hands the object to lm-eval's
`hf` model. The server path is lm-eval's `local-completions` model against /v1/completions:
token ids as the prompt, echo + logprobs for log-likelihoods (what vLLM's server supports).
Tasks are checked, and their data loaded, before any model is: a misspelt task or data that
cannot be fetched costs seconds, not a model load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from sfmp_serve.errors import SFMPError, one_line

INSTALL_HINT = "pip install 'sfmp-serve[lm-eval]'"


@dataclass
class HarnessOptions:
    tasks: list[str]
    include_path: str | None = None  # directory of the user's own task YAML files
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (a fraction if < 1), as lm-eval's --limit
    log_samples: bool = False  # keep each document's responses (results["samples"])


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise SFMPError(f"lm-eval is not installed ({INSTALL_HINT})") from e


def check_tasks(options: HarnessOptions):
    """The TaskManager with every task of `options` known and its data loaded (cached by
    `datasets` for the run itself); SFMPError naming the first task that is not."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if options.include_path and not os.path.isdir(options.include_path):
        raise SFMPError(f"--include-path {options.include_path}: not a directory")
    if not options.tasks:
        raise SFMPError("--tasks: give at least one task name")
    try:
        manager = TaskManager(include_path=options.include_path)
    except Exception as e:  # a malformed YAML under include_path, in lm-eval's words
        where = f"--include-path {options.include_path}" if options.include_path else "lm-eval"
        raise SFMPError(f"{where}: cannot index the tasks ({one_line(e)})") from e
    for name in options.tasks:
        if not manager.match_tasks([name]):
            where = f" or under {options.include_path}" if options.include_path else ""
            raise SFMPError(f"task {name!r}: not one of lm-eval's tasks{where} (list them with "
                            "`lm-eval ls tasks`; --include-path DIR adds task YAML files)")
        try:
            manager.load([name])  # builds the task, which loads its data
        except Exception as e:  # datasets fails with many types (missing file, no network)
            raise SFMPError(f"task {name!r}: cannot load its data ({one_line(e)})") from e
    return manager


def evaluate(lm, options: HarnessOptions, manager) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` (an lm-eval model object) on the checked tasks."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=list(options.tasks), task_manager=manager,
                              num_fewshot=options.num_fewshot, limit=options.limit,
                              log_samples=options.log_samples)
    if results is None:  # lm-eval returns None on non-zero ranks only; one process here
        raise RuntimeError("lm-eval returned no results")
    return results


def hf_lm(path: str | os.PathLike, batch_size: int = 1, device: str = "cpu", dtype=None,
          packed: bool = False):
    """lm-eval's `hf` model over an HF directory or an SFMP checkpoint (loaded by sfmp_serve)."""
    from lm_eval.models.huggingface import HFLM

    from sfmp_serve.eval.hf_ppl import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, device, dtype, packed)
    # HFLM warns that a model object bypasses its own loading options: that is the point here.
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)


def server_lm(url: str, model: str | None = None, tokenizer: str | None = None,
              concurrency: int = 4, timeout: float = 600):
    """lm-eval's `local-completions` model against the OpenAI-compatible server at `url`."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from sfmp_serve.eval.server_ppl import api_base, served_models, tokenizer_source

    listed = served_models(url)
    name = model or listed[0]["id"]
    card = next((m for m in listed if m.get("id") == name), {})
    kwargs: dict[str, Any] = {}
    if isinstance(card.get("max_model_len"), int):  # vLLM lists it; lm-eval assumes 2048
        kwargs["max_length"] = card["max_model_len"]
    return LocalCompletionsAPI(
        base_url=api_base(url) + "/completions", model=name,
        tokenizer=tokenizer_source(url, name, tokenizer), tokenizer_backend="huggingface",
        tokenized_requests=True, num_concurrent=max(1, concurrency), timeout=int(timeout),
        **kwargs)


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} of lm-eval's results (metric names as lm-eval writes them)."""
    return {task: {k: v for k, v in metrics.items() if k not in ("alias", "name")}
            for task, metrics in results.get("results", {}).items()}


def samples(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per scored document: task, doc_id, target, the model's responses, metrics."""
    records = []
    for task, docs in (results.get("samples") or {}).items():
        for doc in docs:
            record = {"task": task, "doc_id": doc["doc_id"], "target": doc.get("target"),
                      "resps": doc.get("resps"), "filtered_resps": doc.get("filtered_resps")}
            record.update({m: doc[m] for m in doc.get("metrics", []) if m in doc})
            records.append(record)
    return records
