"""Prometheus for the observability tests: a real one scraping a real server, queried over its
HTTP API. Process handling is tests/procs.py's."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Proc, free_port


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
