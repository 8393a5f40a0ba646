"""gunicorn settings for web/app.py:  gunicorn -c gunicorn_config.py web.app:app

Every setting can be overridden from the environment (below) or on the command line
(`--bind`, `--workers`, `--timeout`, ...). Why each value: ../shared/SERVING.md §1 and §2.

This file runs in gunicorn's master, so it must not import torch: a parallel torch op in the master
hangs every forked worker (libgomp), and any CUDA call there breaks CUDA in all of them. Each
worker imports the app, and loads its models, after the fork.
"""

import os
import shutil
import tempfile
from pathlib import Path

# gevent workers: thousands of idle or streaming connections per worker; the model runs in a
# native thread of its own (web/scheduler.py), never on the gevent hub
worker_class = "gevent"
# one worker per GPU (worker i serves on GPU i: pre_fork below), or one on a small CPU box; each
# worker holds its own copy of every model
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
bind = os.environ.get("NANOGPT_BIND", "127.0.0.1:8000")  # 0.0.0.0:8000 to listen on every interface
# no preloading: the app (and torch, and the models) are imported in each worker after fork
preload_app = False
# for gevent workers this is a heartbeat deadline, not a request deadline: long streams are fine
timeout = int(os.environ.get("NANOGPT_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5  # clients such as LobeChat's server reuse connections between requests
accesslog = "-"
errorlog = "-"
# one JSON line per request, with a completion's tokens and timings (web/access_log.py)
logger_class = "web.access_log.AccessLogger"
loglevel = os.environ.get("NANOGPT_LOG_LEVEL", "info")

# torch threads per worker, shared out between workers; set here so workers inherit it before they
# import torch (the engine thread also calls torch.set_num_threads with it: web/app.py)
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# torch.compile's inductor forks a compile pool, which hangs under gevent's patched threads
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pre_fork(server, worker):
    """Number the worker about to start with the lowest slot no live worker holds, 0..workers-1.

    Runs in the master, which adds each forked worker to server.WORKERS before the next pre_fork and
    drops a dead one before replacing it: the replacement gets the dead worker's slot, so one
    worker per GPU stays one worker per GPU (web/registry.py's default_device).
    """
    taken = {getattr(w, "nanogpt_slot", None) for w in server.WORKERS.values()}
    worker.nanogpt_slot = next(i for i in range(len(taken) + 1) if i not in taken)


def post_fork(server, worker):
    """In the new worker, before it imports the app: tell web/app.py its slot."""
    os.environ["NANOGPT_WORKER_SLOT"] = str(worker.nanogpt_slot)


# /metrics adds up every worker's figures through files in this directory (web/metrics.py). Set here,
# before any worker imports prometheus_client, which reads it at import; an operator's own is kept.
OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="nanogpt-metrics-")


def on_starting(server):
    """Start from zero: files an earlier server left in an operator's directory would be counted again."""
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()


def child_exit(server, worker):
    """A dead worker's running and waiting requests stop counting; its counters and histograms stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
