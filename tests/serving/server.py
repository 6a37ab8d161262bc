"""A real vLLM server as a subprocess for end-to-end tests: free loopback port, bounded waits,
always killed (whole process group) when the test is done."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# One start is ~60-110 s on 2 shared cores (most of it torch.compile warm-up).
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 120) -> dict | str:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if body is not None else text


class Server:
    """`command` started in its own session, its output in `log`."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, port: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            try:
                request(f"http://127.0.0.1:{port}/health", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.output()[-4000:]}")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The server may be gone while its engine process lingers in the group.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._out.close()
