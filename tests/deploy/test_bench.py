"""`sfmp bench` against an in-process fake OpenAI server: counting, timing, errors, output."""

from __future__ import annotations

import json
import math

import pytest

from sfmp_serve.bench.client import RequestResult
from sfmp_serve.bench.prompts import file_prompts, random_token_prompts
from sfmp_serve.bench.report import format_table, to_json
from sfmp_serve.bench.stats import percentiles_ms, summarize
from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError
from tests.deploy.fake_openai import FAIL_ID, FakeServer


def _bench(capsys, *args: str) -> tuple[int, dict | str]:
    rc = main(["bench", *args])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if "--json" in args else out)


def test_random_prompts_are_exact_length_and_seeded():
    a = random_token_prompts(5, 17, seed=3, vocab_size=50)
    assert [len(p) for p in a] == [17] * 5
    assert all(0 <= t < 50 for p in a for t in p)
    assert a == random_token_prompts(5, 17, seed=3, vocab_size=50)
    assert a != random_token_prompts(5, 17, seed=4, vocab_size=50)
    with pytest.raises(SFMPError, match="--input-len"):
        random_token_prompts(1, 0, seed=0)


def test_prompt_file_cycles_and_rejects_empty(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one two\n\nthree\n")
    prompts = file_prompts(f, 5, seed=0)
    assert len(prompts) == 5 and set(prompts) == {"one two", "three"}
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(SFMPError, match="no non-empty lines"):
        file_prompts(tmp_path / "e.txt", 2, seed=0)
    with pytest.raises(SFMPError, match="missing.txt"):
        file_prompts(tmp_path / "missing.txt", 2, seed=0)


def test_summary_counts_only_successes_and_percentiles():
    ok = [RequestResult(ok=True, ttft_s=0.01 * (i + 1), latency_s=0.1 * (i + 1),
                        itl_s=[0.002, 0.004], prompt_tokens=10, completion_tokens=5)
          for i in range(4)]
    bad = [RequestResult(ok=False, error="HTTP 500: boom")] * 2
    s = summarize(4, ok + bad, duration_s=2.0)
    assert (s.requests, s.completed, s.errors) == (6, 4, 2)
    assert (s.prompt_tokens, s.completion_tokens) == (40, 20)
    assert s.output_throughput == pytest.approx(10.0) and s.request_throughput == 2.0
    assert s.ttft_ms["p50"] == pytest.approx(25.0)
    assert s.itl_ms["p99"] == pytest.approx(4.0, rel=1e-2)
    assert s.error_kinds == {"HTTP 500": 2}
    assert all(math.isnan(v) for v in percentiles_ms([]).values())


def test_bench_against_fake_server_counts_usage_tokens(capsys):
    with FakeServer() as server:
        rc, result = _bench(capsys, "--url", server.url + "/v1/", "--concurrency", "1,3",
                            "--num-prompts", "6", "--input-len", "7", "--output-len", "4",
                            "--seed", "1", "--json")
    assert rc == 0
    assert result["model"] == "fake-model"  # discovered from /v1/models
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv in result["levels"]:
        assert (lv["completed"], lv["errors"]) == (6, 0)
        assert (lv["prompt_tokens"], lv["completion_tokens"]) == (42, 24)
        assert 0 < lv["ttft_ms"]["p50"] <= lv["e2e_ms"]["p50"]
        assert lv["itl_ms"]["p50"] > 0
    body = server.requests[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["max_tokens"] == 4 and len(body["prompt"]) == 7
    assert len(server.requests) == 12


def test_bench_reports_http_errors_and_missing_usage(capsys):
    with FakeServer() as server:
        # vocab 14 makes some prompts start with FAIL_ID (13): those answer HTTP 500.
        rc, result = _bench(capsys, "--url", server.url, "--concurrency", "2",
                            "--num-prompts", "40", "--input-len", "3", "--output-len", "2",
                            "--vocab-size", "14", "--json")
        failing = sum(1 for r in server.requests if r["prompt"][0] == FAIL_ID)
    level = result["levels"][0]
    assert rc == 0 and 0 < failing < 40
    assert (level["errors"], level["completed"]) == (failing, 40 - failing)
    assert level["error_kinds"] == {"HTTP 500": failing}
    with FakeServer(usage=False) as server:
        rc, result = _bench(capsys, "--url", server.url, "--concurrency", "1",
                            "--num-prompts", "2", "--input-len", "3", "--output-len", "2",
                            "--json")
    assert rc == 1  # nothing measured: every request failed
    assert result["levels"][0]["completed"] == 0
    kinds = result["levels"][0]["error_kinds"]
    assert len(kinds) == 1 and next(iter(kinds)).startswith("stream ended without usage")


def test_table_json_and_plot(tmp_path, capsys):
    with FakeServer() as server:
        first = tmp_path / "first.json"
        rc, result = _bench(capsys, "--url", server.url, "--concurrency", "1,2",
                            "--num-prompts", "3", "--input-len", "4", "--output-len", "3",
                            "--json", "--label", "base")
        first.write_text(json.dumps(result))
        rc, table = _bench(capsys, "--url", server.url, "--concurrency", "1,2",
                           "--num-prompts", "3", "--input-len", "4", "--output-len", "3",
                           "--plot", str(tmp_path / "b.png"), "--compare", str(first))
    assert rc == 0 and result["label"] == "base"
    assert "TTFT p50" in table and table.count("\n") >= 3
    png = (tmp_path / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    nan_free = to_json({**result, "levels": [{**result["levels"][0],
                                              "ttft_ms": {"p50": float("nan")}}]})
    assert '"p50": null' in nan_free
    assert "fake-model" in format_table(result)


def test_bench_user_errors_exit_2(tmp_path, capsys):
    assert main(["bench", "--url", "localhost:1", "--num-prompts", "1"]) == 2
    assert main(["bench", "--url", "http://127.0.0.1:9", "--compare", "x.json"]) == 2
    assert "--compare only makes sense with --plot" in capsys.readouterr().err
    # Nothing listens on port 9: /v1/models cannot be reached, so the model cannot be chosen.
    assert main(["bench", "--url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    assert "cannot reach http://127.0.0.1:9/v1/models" in capsys.readouterr().err
    # With --model given, requests are sent and each connection failure is counted.
    rc, result = _bench(capsys, "--url", "http://127.0.0.1:9", "--model", "m",
                        "--num-prompts", "2", "--concurrency", "2", "--json")
    assert rc == 1 and result["levels"][0]["error_kinds"] == {"ClientConnectorError": 2}
    with pytest.raises(SystemExit):
        main(["bench", "--url", "http://x", "--concurrency", "0,2"])
