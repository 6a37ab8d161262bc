"""sfmp eval ppl: windowing, HF perplexity against a direct computation, the server path."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError
from sfmp_serve.eval import hf_perplexity, make_windows, server_perplexity, tokenize_windows
from tests.tiny import CORPUS

TEXT = " ".join(CORPUS[:6])


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_windows_with_bos():
    windows = make_windows(list(range(10, 20)), seqlen=4, bos_id=0)
    assert windows == [[0, 10, 11, 12], [0, 13, 14, 15], [0, 16, 17, 18], [0, 19]]
    assert make_windows(list(range(10, 20)), 4, 0, max_tokens=5) == [[0, 10, 11, 12],
                                                                      [0, 13, 14]]


def test_windows_without_bos_drop_lone_tail():
    assert make_windows(list(range(9)), seqlen=4, bos_id=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("seqlen,max_tokens", [(1, None), (8, 1)])
def test_windows_reject_bad_sizes(seqlen, max_tokens):
    with pytest.raises(SFMPError):
        make_windows(list(range(10)), seqlen, 0, max_tokens)


def direct_ppl(model_dir, text, seqlen):
    """exp(mean NLL) written out independently: one token stream, BOS + seqlen-1 per window."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nlls = []
    for start in range(0, len(ids), seqlen - 1):
        window = torch.tensor([[tok.bos_token_id] + ids[start:start + seqlen - 1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
        for pos in range(1, window.shape[1]):
            nlls.append(-logp[pos - 1, window[0, pos]].item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_cli_ppl_equals_direct_computation(tiny_llama, text_file, capsys):
    assert main(["eval", "ppl", str(tiny_llama), "--text", str(text_file), "--seqlen", "48",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want, tokens = direct_ppl(tiny_llama, TEXT, 48)
    assert got["tokens"] == tokens and got["seqlen"] == 48
    assert got["ppl"] == pytest.approx(want, rel=1e-4)


def test_cli_ppl_of_sfmp_checkpoint_dequantized_equals_packed(llama_ckpt, text_file, capsys):
    ppl = {}
    for mode in ([], ["--packed"]):
        assert main(["eval", "ppl", str(llama_ckpt.path), "--text", str(text_file), "--seqlen",
                     "64", "--max-tokens", "100", "--json", *mode]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["tokens"] == 100 and math.isfinite(got["ppl"]) and got["ppl"] > 1
        ppl[bool(mode)] = got["ppl"]
    # Same weights, float32 accumulation in both: only the summation order differs.
    assert ppl[False] == pytest.approx(ppl[True], rel=1e-5)


def test_dequantized_linears_match_the_packed_op(llama_ckpt):
    from sfmp_serve.hf import DequantizedLinear, SFMPLinear, load_sfmp_model

    packed = load_sfmp_model(llama_ckpt.path)
    dense = load_sfmp_model(llama_ckpt.path, dequantized=True)
    n_packed = sum(isinstance(m, SFMPLinear) for m in packed.modules())
    assert n_packed and n_packed == sum(isinstance(m, DequantizedLinear) for m in dense.modules())
    assert not any(isinstance(m, SFMPLinear) for m in dense.modules())
    ids = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, packed(ids).logits, rtol=1e-4, atol=1e-4)


class FakeCompletions(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions that scores prompts with a local HF model."""

    model = None
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(req)
        ids = torch.tensor([req["prompt"]])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(ids).logits[0].float(), -1)
        prompt_lp = [None] + [logp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])]
        self._send({"choices": [{"text": "", "logprobs": {"token_logprobs": prompt_lp + [-1.0]}}]})


@pytest.fixture()
def fake_server(tiny_llama):
    FakeCompletions.model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    FakeCompletions.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_path_scores_the_same_windows(tiny_llama, fake_server):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    windows = tokenize_windows(tok, TEXT, seqlen=40)
    hf = hf_perplexity(FakeCompletions.model, windows, 40, progress=False)
    served = server_perplexity(fake_server, windows, 40, concurrency=3, progress=False)
    assert served.tokens == hf.tokens and served.windows == hf.windows == len(windows)
    assert served.ppl == pytest.approx(hf.ppl, rel=1e-4)
    req = FakeCompletions.requests[0]
    assert req["model"] == "tiny" and req["echo"] is True and req["logprobs"] == 1
    assert req["max_tokens"] == 1 and sorted(map(tuple, (r["prompt"] for r in
                                                         FakeCompletions.requests))) == \
        sorted(map(tuple, windows))


def test_cli_server_needs_a_tokenizer(fake_server, text_file, capsys):
    # the fake server's model id "tiny" is no local directory
    assert main(["eval", "ppl", "--server", fake_server, "--text", str(text_file)]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_cli_server_with_tokenizer(tiny_llama, fake_server, text_file, capsys):
    assert main(["eval", "ppl", "--server", fake_server, "--tokenizer", str(tiny_llama),
                 "--text", str(text_file), "--seqlen", "48", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl"] == pytest.approx(direct_ppl(tiny_llama, TEXT, 48)[0], rel=1e-4)


def test_cli_errors(tiny_llama, tmp_path, capsys):
    assert main(["eval", "ppl", str(tiny_llama), "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: text file not found" in capsys.readouterr().err
    assert main(["eval", "ppl", "--text", str(tmp_path / "x.txt")]) == 2
    assert main(["eval", "ppl", "--server", "http://127.0.0.1:9", "--tokenizer",
                 str(tiny_llama), "--text", __file__, "--model", "m"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
