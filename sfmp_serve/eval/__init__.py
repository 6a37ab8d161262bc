"""Evaluation: perplexity over a transformers model or an OpenAI-compatible server."""

from sfmp_serve.eval.hf_ppl import hf_perplexity, load_model_and_tokenizer, window_nll
from sfmp_serve.eval.server_ppl import server_perplexity
from sfmp_serve.eval.windows import PplResult, make_windows, read_text, tokenize_windows

__all__ = ["PplResult", "make_windows", "read_text", "tokenize_windows", "hf_perplexity",
           "load_model_and_tokenizer", "window_nll", "server_perplexity"]
