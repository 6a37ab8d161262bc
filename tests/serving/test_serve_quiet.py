"""`sfmp serve` quiet by default, against a stand-in for vLLM (a script that logs like it, answers
/health and fails or stops on cue): the terminal shows the log's path, the ready line, vLLM's
errors and, on a failed start, the condensed end of the log; the log file holds everything.
The real server in quiet mode is tested in test_lm_eval.py."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from sfmp_serve.cli import main as cli_main
from sfmp_serve.cli import serve
from sfmp_serve.cli.vllm_output import log_tail
from tests.procs import free_port
from tests.serving.checkpoints import make_random_checkpoint
from tests.tiny import make_tiny_model

# What vLLM's processes print, environment noise included (seen on these machines).
BANNER = "(APIServer pid=1) INFO 12-01 18:00:00 [api_utils.py:347] vllm says hello"
NOISE = ["Triton is installed, but doesn't include CPU backend. Disabling Triton.",
         "nanobind: leaked 4 instances!",
         ' - leaked instance 0x7f of type "triton._C.libtriton.ir.attribute"']
TRACEBACK = ["Traceback (most recent call last):",
             '  File "/venv/vllm/engine/arg_utils.py", line 1955, in create_model_config',
             "    return ModelConfig(",
             "           ^^^^^^^^^^^^",
             "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
             "  Value error, max_model_len (1024) is greater than the derived max_model_len"]
SERVING_ERROR = "(APIServer pid=1) ERROR 12-01 18:00:09 [serving.py:1] request 7 failed: boom"

FAKE_VLLM = r"""
import http.server, pathlib, signal, sys, threading, time
tmp, port, mode = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lines = __import__("json").loads(sys.argv[4])
for line in lines["start"]:
    print(line, flush=True)
if mode == "fail":
    sys.exit(1)
polled = threading.Event()

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); polled.set()
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
polled.wait(60)
time.sleep(0.5)
print(lines["serving_error"], flush=True)
(tmp / "error_printed").touch()
time.sleep(60)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_quiet")
    model = make_tiny_model(root / "model", "llama", heads=3, kv_heads=1, layers=1)
    return make_random_checkpoint(model, root / "sfmp")


def _fake_vllm(monkeypatch, tmp_path, mode: str) -> None:
    import json
    lines = json.dumps({"start": [BANNER, *NOISE, *TRACEBACK], "serving_error": SERVING_ERROR})
    monkeypatch.setattr(serve, "vllm_command", lambda checkpoint, host, port, extra: [
        sys.executable, "-c", FAKE_VLLM, str(tmp_path), str(port), mode, lines])


def test_failed_start_shows_the_error_not_the_log(monkeypatch, checkpoint, tmp_path, capfd):
    _fake_vllm(monkeypatch, tmp_path, "fail")
    log = tmp_path / "vllm.log"
    assert cli_main.main(["serve", str(checkpoint), "--port", str(free_port()),
                          "--log-file", str(log)]) == 1
    out, err = capfd.readouterr()
    assert f"its log: {log}" in out and BANNER not in out
    assert f"vLLM exited with status 1 during start-up; the end of its log ({log})" in err
    tail = err.split("end of its log")[1]
    assert TRACEBACK[4] in tail and TRACEBACK[5] in tail and TRACEBACK[0] in tail
    assert TRACEBACK[1] not in tail and TRACEBACK[2] not in tail  # frames condensed away
    assert not any(noise in tail for noise in NOISE)
    assert log.read_text().splitlines() == [BANNER, *NOISE, *TRACEBACK]  # the file: all of it


def test_ready_line_then_errors_while_serving_then_stop(monkeypatch, checkpoint, tmp_path,
                                                        capfd):
    _fake_vllm(monkeypatch, tmp_path, "serve")
    port = free_port()

    def stop_after_the_error():
        for _ in range(600):
            if (tmp_path / "error_printed").exists():
                break
            threading.Event().wait(0.05)
        threading.Event().wait(2.5)  # two polls of the log
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_after_the_error)
    stopper.start()
    code = cli_main.main(["serve", str(checkpoint), "--port", str(port), "--log-file",
                          str(tmp_path / "vllm.log")])
    stopper.join()
    out, err = capfd.readouterr()
    assert code == 0
    assert "ready after" in out and f"http://127.0.0.1:{port} (OpenAI API under /v1" in out
    assert SERVING_ERROR in err  # errors reach the terminal once it serves
    assert BANNER not in out + err and "Traceback" not in out + err  # start-up stays in the log
    assert f"vLLM stopped (status 0); its log: {tmp_path / 'vllm.log'}" in out


def test_verbose_shows_vllm_output_and_writes_no_log(monkeypatch, checkpoint, tmp_path, capfd):
    _fake_vllm(monkeypatch, tmp_path, "fail")
    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cli_main.main(["serve", "--verbose", str(checkpoint), "--port",
                          str(free_port())]) == 1
    out, err = capfd.readouterr()
    assert BANNER in out and "its log" not in out + err
    assert not list((tmp_path / "tmp").iterdir())


def test_default_log_file_is_new_and_named(monkeypatch, checkpoint, tmp_path, capfd):
    _fake_vllm(monkeypatch, tmp_path, "fail")
    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    port = free_port()
    assert cli_main.main(["serve", str(checkpoint), "--port", str(port)]) == 1
    [log] = tmp_path.glob(f"sfmp-serve-{port}-*.log")
    assert f"its log: {log}" in capfd.readouterr().out


@pytest.mark.parametrize("bad", ["missing/dir/v.log", "."])
def test_bad_log_file_is_one_line(checkpoint, tmp_path, capsys, bad):
    assert cli_main.main(["serve", str(checkpoint), "--log-file", str(tmp_path / bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--log-file" in err and "not a file" in err


def test_tail_keeps_vllm_prefixed_exceptions_without_frames(tmp_path):
    prefix = "(EngineCore pid=9) ERROR 12-01 18:00:01 [core.py:1] "
    log = tmp_path / "v.log"
    log.write_text("\n".join([prefix + "EngineCore failed to start.",
                              prefix + "Traceback (most recent call last):",
                              prefix + '  File "/x/core.py", line 3, in run',
                              prefix + "    load()",
                              prefix + "    ^^^^^^",
                              prefix + "sfmp_serve.errors.FormatError: layer l: tensor t: bad",
                              *NOISE]) + "\n")
    assert log_tail(log) == [prefix + "EngineCore failed to start.",
                             prefix + "Traceback (most recent call last):",
                             prefix + "sfmp_serve.errors.FormatError: layer l: tensor t: bad"]
