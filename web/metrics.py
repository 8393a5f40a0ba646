"""The server's Prometheus metrics (GET /metrics), over every gunicorn worker.

    curl http://127.0.0.1:8000/metrics          # Prometheus' text format; the key too when keys are set

Under gunicorn each worker writes its figures into files in PROMETHEUS_MULTIPROC_DIR (created and
emptied by gunicorn_config.py before the workers start), and /metrics adds up every worker's files,
whichever worker answers: prometheus_client's multiprocess mode. Counters and histograms keep the
figures of a worker that died; the running and waiting gauges count live workers only. Without that
variable (a test's app, the Flask dev server) the figures are this process's.

Every update runs on the gevent hub (request greenlets and the scheduler greenlet), never in an
engine thread: prometheus_client's locks are gevent's once gunicorn has patched threading.

Names follow Prometheus' conventions: a unit suffix (_seconds, _tokens), _total on counters. Labels
are bounded: `model` is a served run directory's name (an unknown one is ""), `endpoint` a route of
the app. The README's "Operating it" lists each metric with what to watch.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FINISH_REASONS = ("stop", "length", "cancelled", "error")  # cancelled: the client left before the end


def multiprocess_dir() -> str | None:
    """The directory the workers share their figures through, when gunicorn_config.py set one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    """One app's metrics. enabled=False (NANOGPT_METRICS=0) records nothing and serves no /metrics,
    for measuring what they cost (bench/serve_load.py --compare_metrics)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.registry = CollectorRegistry()  # this app's own: no global state shared between apps
        r = self.registry
        self.http_requests = Counter("nanogpt_http_requests", "HTTP requests answered, by endpoint, model and status",
                                     ["endpoint", "model", "status"], registry=r)
        self.ttft = Histogram("nanogpt_time_to_first_token_seconds",
                              "Time from a completion request's arrival to its first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("nanogpt_request_duration_seconds",
                                 "Time from a completion request's arrival to its last token (or its end)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Histogram("nanogpt_request_completion_tokens", "Tokens generated per completion request",
                                   ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nanogpt_prompt_tokens", "Prompt tokens of completion requests", ["model"], registry=r)
        self.completion_tokens = Counter("nanogpt_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter("nanogpt_requests_finished", "Completion requests by how they ended "
                                "(stop, length, cancelled: the client left, error: generation failed)",
                                ["model", "finish_reason"], registry=r)
        self.rejected = Counter("nanogpt_requests_rejected", "Completion requests answered 503 (queue full or "
                                "every loaded model busy): raise NANOGPT_MAX_WAITING or add workers", ["model"], registry=r)
        self.running = Gauge("nanogpt_requests_running", "Requests being decoded now", ["model"],
                             multiprocess_mode="livesum", registry=r)
        self.waiting = Gauge("nanogpt_requests_waiting", "Requests queued for a free row", ["model"],
                             multiprocess_mode="livesum", registry=r)
        self.batch_rows = Histogram("nanogpt_decode_batch_rows", "Requests decoded together per engine step",
                                    ["model"], buckets=ROW_BUCKETS, registry=r)
        self.loads = Counter("nanogpt_model_loads", "Models loaded by a worker, by outcome (ok, failed)",
                             ["model", "outcome"], registry=r)
        self.load_time = Histogram("nanogpt_model_load_duration_seconds", "Time a worker took to load a model",
                                   ["model"], buckets=LOAD_BUCKETS, registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text /metrics answers with, and its content type: every worker's figures under gunicorn."""
        registry = self.registry
        if directory := multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    # --- what the app and the schedulers report

    def request(self, endpoint: str, model: str, status: int) -> None:
        if self.enabled:
            self.http_requests.labels(endpoint, model, str(status)).inc()

    def completion(self, model: str, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                   duration: float, finish_reason: str) -> None:
        """A completion request that reached the engine has ended (any way: finish_reason)."""
        if not self.enabled:
            return
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        self.latency.labels(model).observe(duration)
        self.generated.labels(model).observe(completion_tokens)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.finished.labels(model, finish_reason).inc()

    def rejection(self, model: str) -> None:
        if self.enabled:
            self.rejected.labels(model).inc()

    def queue(self, model: str, running: int, waiting: int) -> None:
        if self.enabled:
            self.running.labels(model).set(running)
            self.waiting.labels(model).set(waiting)

    def decode_step(self, model: str, rows: int) -> None:
        if self.enabled:
            self.batch_rows.labels(model).observe(rows)

    def model_load(self, model: str, seconds: float, ok: bool) -> None:
        if self.enabled:
            self.loads.labels(model, "ok" if ok else "failed").inc()
            self.load_time.labels(model).observe(seconds)
