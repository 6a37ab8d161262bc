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
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own process group, logging to `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._log_file = open(log, "wb")
        self.popen = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_http(self, url: str, timeout_s: float) -> None:
        """Poll `url` until it answers 200; fail early if the process exits."""
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


def start_prometheus(target: str, workdir: Path) -> tuple[Proc, str]:
    """A real Prometheus scraping `target` (host:port) every second; returns (proc, url)."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: sfmp\n    static_configs: [{{targets: ['{target}']}}]\n")
    proc = Proc(["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], workdir / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/-/ready", timeout_s=60)
    return proc, url


def prom_query(url: str, expr: str) -> list[dict]:
    """Instant query through the HTTP API; the result vector (empty when no data)."""
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise AssertionError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {sample name: value summed over label sets}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
