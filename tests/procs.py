"""Real server processes for end-to-end tests: start, wait with a deadline, always kill.

Each process runs in its own session so that stopping it also stops its children (vLLM's
engine core and workers), and its output goes to a log file whose tail is shown on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# One vLLM start is ~60-110 s on 2 shared cores (most of it torch.compile warm-up).
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 120) -> dict | str:
    """GET (no body: the text) or POST JSON (the decoded JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if body is not None else text


class Proc:
    """`cmd` in its own process group, its output in `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._log_file = open(log, "wb")
        self.popen = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]

    def wait_http(self, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll `url` until it answers 200; fail early, with the log's tail, if the process
        exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.log.name}: exited {self.popen.returncode}\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s\n{self.tail()}")

    def wait_exit(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """The exit status of a process expected to end by itself (then stop what is left)."""
        try:
            return self.popen.wait(timeout_s)
        finally:
            self.stop()

    def stop(self) -> None:
        """SIGTERM the whole group; after 20 s SIGKILL whatever of it is left."""
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            pass
        try:  # children (engine core, workers) can outlive the leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        self._log_file.close()


@contextmanager
def serving(checkpoint: Path, log: Path, *args: str) -> Iterator[str]:
    """`sfmp serve --verbose CHECKPOINT ARGS` on a free port for the block; yields its base URL.
    --verbose: vLLM's own output goes to `log`, whose tail a failed start shows."""
    port = free_port()
    proc = Proc([sys.executable, "-m", "sfmp_serve.cli.main", "serve", "--verbose",
                 str(checkpoint), "--port", str(port), *args], log)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()
