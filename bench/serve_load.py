"""Serving under load: a real gunicorn + gevent server (gunicorn_config.py, one worker) with a GPT-2
124M-shape model, and N = 1, 4, 8, 16 concurrent streaming clients.

Prints, per N: aggregate tokens/s, p50/p95 time to first token, median per-stream tokens/s, and
/health latency p50/p95/max measured by a prober every 50 ms while the streams run. The ratio that
matters is aggregate(8) / aggregate(1): the engine decodes all active requests in one batched
forward per step, and a CPU decode step is bound by reading the weights, so 8 rows cost little
more than 1.

    python bench/serve_load.py                     # ~2 minutes on a 2-core CPU
    python bench/serve_load.py --clients 1,8 --max_tokens 64
    python bench/serve_load.py --quant int8        # the server with NANOGPT_QUANT=int8
    python bench/serve_load.py --compare metrics --clients 8    # what /metrics costs: on against off
    python bench/serve_load.py --compare quant --clients 1,8    # int8 weights against float32

--compare starts two servers, with metrics (the default) and with NANOGPT_METRICS=0, or with
NANOGPT_QUANT=int8 and without, and runs the same load on each in turn, --rounds times, alternating;
it prints the median aggregate tokens/s of each and their ratio.

The weights are random (no download); their <|endoftext|> embedding is zeroed so that greedy
decoding never ends a stream early and every stream generates exactly --max_tokens tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from model.cli import QUANT_TYPES  # noqa: E402
from model.compute import describe_cpu  # noqa: E402
from model.gpt import GPTConfig  # noqa: E402
from serving import gunicorn_server, write_model  # noqa: E402  (the tests' server harness)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def stream(host: str, i: int, max_tokens: int, start: threading.Barrier, out: dict) -> None:
    """One client: a streaming request; records when it started, got its first text and ended."""
    body = {
        "model": "gpt2-124m-random",
        "messages": [{"role": "user", "content": f"Request {i}: write a long story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection(host, timeout=600)
    start.wait()
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = tokens = None
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
            first = time.monotonic()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    out[i] = {"start": t0, "first": first, "end": time.monotonic(), "tokens": tokens}
    conn.close()


def probe_health(host: str, stop: threading.Event, latencies: list[float]) -> None:
    conn = http.client.HTTPConnection(host, timeout=60)
    while not stop.is_set():
        t0 = time.monotonic()
        conn.request("GET", "/health")
        conn.getresponse().read()
        latencies.append(time.monotonic() - t0)
        stop.wait(0.05)
    conn.close()


def run_load(host: str, n: int, max_tokens: int) -> dict:
    results, latencies, stop = {}, [], threading.Event()
    start = threading.Barrier(n)
    clients = [threading.Thread(target=stream, args=(host, i, max_tokens, start, results)) for i in range(n)]
    prober = threading.Thread(target=probe_health, args=(host, stop, latencies))
    prober.start()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    stop.set()
    prober.join()
    runs = list(results.values())
    assert all(r["tokens"] == max_tokens for r in runs), "every stream should generate exactly max_tokens"
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttft = [r["first"] - r["start"] for r in runs]
    return {
        "n": n,
        "aggregate": sum(r["tokens"] for r in runs) / wall,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": percentile(ttft, 0.95),
        "per_stream": statistics.median(r["tokens"] / (r["end"] - r["first"]) for r in runs),
        "health_p50": percentile(latencies, 0.5) * 1000,
        "health_p95": percentile(latencies, 0.95) * 1000,
        "health_max": max(latencies) * 1000,
    }


# two server settings to set side by side: (name, its environment) for each
COMPARISONS = {
    "metrics": [("metrics on", {"NANOGPT_METRICS": "1"}), ("metrics off", {"NANOGPT_METRICS": "0"})],
    "quant": [("int8", {"NANOGPT_QUANT": "int8"}), ("float32", {"NANOGPT_QUANT": "none"})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--max_tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--max_rows", type=int, default=16, help="the server's NANOGPT_MAX_ROWS")
    parser.add_argument("--quant", default="none", choices=QUANT_TYPES, help="the server's NANOGPT_QUANT")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default=None,
                        help="two servers side by side: metrics on / off, or int8 / float32 weights")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per setting with --compare")
    args = parser.parse_args()
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable
    counts = [int(c) for c in args.clients.split(",")]
    if args.compare:
        compare(counts, args, COMPARISONS[args.compare])
        return

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_model(models, "gpt2-124m-random", GPTConfig())  # GPT-2 124M shape
        # every core for the one worker, as gunicorn_config.py sets it (the tests' harness pins 1)
        env = {"NANOGPT_MAX_ROWS": str(args.max_rows), "OMP_NUM_THREADS": str(os.cpu_count() or 1),
               "NANOGPT_QUANT": args.quant}
        with gunicorn_server(models, Path(tmp) / "gunicorn.log", env) as server:
            host = server.url.removeprefix("http://")
            run_load(host, 1, 8)  # load the model and warm up before measuring
            rows = [run_load(host, n, args.max_tokens) for n in counts]

    weights = "int8 weights" if args.quant == "int8" else "fp32"
    print(f"GPT-2 124M shape, {weights}, one gevent worker, {args.max_tokens} tokens per stream, greedy")
    print("| streams | aggregate tok/s | TTFT p50 / p95 (s) | per-stream tok/s | /health p50 / p95 / max (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['aggregate']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['per_stream']:.1f} "
            f"| {r['health_p50']:.0f} / {r['health_p95']:.0f} / {r['health_max']:.0f} |"
        )
    single = next((r["aggregate"] for r in rows if r["n"] == 1), None)
    if single:
        for r in rows:
            if r["n"] > 1:
                print(f"aggregate at {r['n']} streams / 1 stream: {r['aggregate'] / single:.2f}x")


def compare(counts: list[int], args: argparse.Namespace, settings: list[tuple[str, dict]]) -> None:
    """The same loads against two servers that differ in settings, alternating, side by side."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        models = Path(tmp) / "models"
        write_model(models, "gpt2-124m-random", GPTConfig())
        hosts = {}
        for index, (name, setting) in enumerate(settings):
            env = {"NANOGPT_MAX_ROWS": str(args.max_rows), "OMP_NUM_THREADS": str(os.cpu_count() or 1),
                   "NANOGPT_QUANT": args.quant, **setting}
            server = stack.enter_context(gunicorn_server(models, Path(tmp) / f"gunicorn-{index}.log", env))
            hosts[name] = server.url.removeprefix("http://")
            run_load(hosts[name], 1, 8)  # load the model and warm up before measuring
        (a, _), (b, _) = settings
        print(f"GPT-2 124M shape, one gevent worker per server, {args.max_tokens} tokens per stream, greedy; "
              f"median of {args.rounds} alternating runs")
        print(f"| streams | aggregate tok/s, {a} | {b} | {a} / {b} |")
        print("|---|---|---|---|")
        for n in counts:
            runs = {name: [] for name in hosts}
            for _ in range(args.rounds):
                for name, host in hosts.items():
                    runs[name].append(run_load(host, n, args.max_tokens)["aggregate"])
            first, second = statistics.median(runs[a]), statistics.median(runs[b])
            print(f"| {n} | {first:.1f} | {second:.1f} | {first / second:.3f} |", flush=True)


if __name__ == "__main__":
    main()
