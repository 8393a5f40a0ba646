"""Operating the server: /metrics over every gunicorn worker, the JSON access log, and what the
endpoints without a key show. A real gunicorn with 2 gevent workers, on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from model.gpt import GPTConfig
from serving import gunicorn_server, metric_samples, metric_total, write_model
from test_serving import raw
from web.access_log import access_line

KEY = "sk-ops-1"
TINY = GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64)
SECRET = "my private question about the merger"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_model(models, "tiny", TINY)
    # the operator's own metrics directory, holding a stale file from an earlier server: it must not count
    metrics_dir = tmp_path_factory.mktemp("metrics")
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")
    env = {"NANOGPT_API_KEYS": KEY, "NANOGPT_MAX_ROWS": "1", "NANOGPT_MAX_WAITING": "1",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WEB_CONCURRENCY": "2"}
    log = tmp_path_factory.mktemp("logs") / "gunicorn.log"
    with gunicorn_server(models, log, env) as s:
        s.metrics_dir = metrics_dir
        yield s


def test_metrics_count_every_worker(server):
    n = 12
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    results = []

    def ask(i: int) -> None:  # one connection each, several at once: both workers take some
        fresh = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=5)
        reply = fresh.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}],
                                              max_tokens=4, temperature=0, stream=i % 2 == 0)
        results.append(reply.choices[0].message.content if i % 2 else "".join(c.choices[0].delta.content or "" for c in reply))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n
    # both workers wrote figures (one file per process), and the stale file was cleared at start
    pids = {p.stem.rsplit("_", 1)[1] for p in server.metrics_dir.glob("counter_*.db")}
    assert len(pids) == 2 and "999999" not in pids
    scraped = metric_samples(server.metrics_text())  # once: every figure below is from the same moment
    # the client retries a 503 (a full queue in the worker it reached): those count as 503s, answers as 200s
    assert metric_total(scraped, "nanogpt_http_requests_total", endpoint="/v1/chat/completions", status="200") == n
    assert metric_total(scraped, "nanogpt_time_to_first_token_seconds_count", model="tiny") == n
    assert metric_total(scraped, "nanogpt_request_duration_seconds_count", model="tiny") == n
    assert metric_total(scraped, "nanogpt_completion_tokens_total", model="tiny") == 4 * n
    assert metric_total(scraped, "nanogpt_requests_finished_total", model="tiny", finish_reason="length") == n
    assert metric_total(scraped, "nanogpt_model_loads_total", model="tiny", outcome="ok") == 2  # once per worker
    # idle again: nothing running or waiting, in either worker
    assert metric_total(scraped, "nanogpt_requests_running", model="tiny") == 0
    assert metric_total(scraped, "nanogpt_requests_waiting", model="tiny") == 0
    assert client.models.list().data


def test_a_burst_past_the_queue_shows_as_503s(server):
    before = metric_total(metric_samples(server.metrics_text()), "nanogpt_requests_rejected_total", model="tiny")
    statuses = []

    def ask() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "temperature": 0}
        statuses.append(raw(server, "POST", "/v1/chat/completions", body, key=KEY)[0])

    # 2 workers x (1 running + 1 waiting) hold 4; the rest of 16 at once are turned away
    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = statuses.count(503)
    assert refused > 0 and statuses.count(200) + refused == 16
    scraped = metric_samples(server.metrics_text())
    assert metric_total(scraped, "nanogpt_requests_rejected_total", model="tiny") - before == refused
    assert metric_total(scraped, "nanogpt_http_requests_total", endpoint="/v1/chat/completions", status="503") >= refused


def test_unauthenticated_endpoints_show_nothing_private(server):
    status, _, body = raw(server, "GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok", "models": {"tiny": {"state": "ready"}}}
    assert raw(server, "GET", "/metrics", key=None)[0] == 401
    assert raw(server, "GET", "/metrics", key="sk-wrong")[0] == 401


def test_access_log_says_what_a_stream_cost_and_nothing_private(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    status, _, data = raw(server, "POST", "/v1/chat/completions", body, key=KEY)
    assert status == 200
    usage = json.loads([line for line in data.decode().split("\n") if '"usage": {' in line][-1][6:])["usage"]

    def mine() -> list[dict]:
        lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
        return [r for r in lines if r.get("path") == "/v1/chat/completions" and r["status"] == 200
                and r.get("completion_tokens") == 5 and r.get("prompt_tokens") == usage["prompt_tokens"]]

    deadline = time.monotonic() + 10  # gunicorn writes the line just after the body's last byte has gone
    while not mine() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert mine(), log[-3000:]
    line = mine()[-1]
    assert line["model"] == "tiny" and line["method"] == "POST" and line["finish_reason"] == "length"
    assert line["completion_tokens"] == usage["completion_tokens"] == 5
    assert 0 < line["ttft_s"] <= line["duration_s"]
    assert SECRET not in log and KEY not in log
    # every request has one line, a health check too
    assert any(r.get("path") == "/health" and "model" not in r for r in lines)


def test_access_line_of_a_stream_cut_off_by_its_client():
    environ = {"REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions",
               "QUERY_STRING": "key=sk-in-the-url", "HTTP_AUTHORIZATION": "Bearer sk-secret",
               "nanogpt.completion": [{"model": "m", "prompt_tokens": 9, "completion_tokens": 3, "ttft_s": 0.05,
                                       "finish_reason": None}]}
    line = access_line(environ, 200, 1.23456, now=0.5)
    assert json.loads(line) == {"time": "1970-01-01T00:00:00.500Z", "remote": "10.0.0.7", "method": "POST",
                                "path": "/v1/chat/completions", "status": 200, "duration_s": 1.2346, "model": "m",
                                "prompt_tokens": 9, "completion_tokens": 3, "ttft_s": 0.05, "finish_reason": "cancelled"}
    assert "sk-" not in line
