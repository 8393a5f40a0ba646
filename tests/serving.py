"""Helpers for the serving tests: models written into a models directory, and a real gunicorn +
gevent server on a free 127.0.0.1 port that is always stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT
from model.checkpoint import checkpoint_path, model_state, save_checkpoint
from model.gpt import GPT, GPTConfig
from model.prompt import chat_turns, prompt_tokens
from model.tokenizer import EOT, encode
from test_hellaswag import free_port
from web.metrics import FINISH_REASONS

ECHO_PROMPT = "日本語で話して🙂"
ECHO_REPLY = "日本語のテキスト🙂 and ü, done."  # multi-byte characters split across byte-level tokens


def write_model(models_dir: Path, name: str, config: GPTConfig, seed: int = 0, step: int = 1) -> GPT:
    """A random model as run `name`. Its <|endoftext|> embedding is zero, so greedy decoding never
    picks it (a logit of 0 against 50k random ones): streams run to max_tokens."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight[EOT] = 0
    save_checkpoint(model_state(model) | {"step": step}, checkpoint_path(models_dir / name, step))
    return model


def write_echo_model(models_dir: Path, name: str) -> None:
    """A tiny model trained (a few seconds) to answer ECHO_PROMPT with ECHO_REPLY and <|endoftext|>."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    tokens = prompt_tokens(chat_turns([{"role": "user", "content": ECHO_PROMPT}])) + encode(ECHO_REPLY) + [EOT]
    x, y = torch.tensor([tokens[:-1]]), torch.tensor([tokens[1:]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(model_state(model) | {"step": 60}, checkpoint_path(models_dir / name, 60))


def write_nan_model(models_dir: Path, name: str) -> None:
    """A diverged model (NaN weights): sampling from it fails inside the generation step."""
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    save_checkpoint(model_state(model) | {"step": 1}, checkpoint_path(models_dir / name, 1))


def metric_samples(metrics_text: str) -> list:
    """Every sample of a /metrics text, as prometheus_client's parser reads it (name, labels, value)."""
    return [s for family in text_string_to_metric_families(metrics_text) for s in family.samples]


def metric_total(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples called name whose labels include `labels` (0 if there are none)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def figures(metrics_text: str, model: str) -> dict:
    """What a /metrics text says of one model: requests running and waiting now, requests finished by
    reason (cancelled: the client left), rejected (503), tokens generated, and decode steps that ran
    more than one request."""
    samples = metric_samples(metrics_text)

    def total(name: str, **labels: str) -> float:
        return metric_total(samples, name, model=model, **labels)

    return {"running": total("nanogpt_requests_running"), "waiting": total("nanogpt_requests_waiting"),
            "finished": {r: total("nanogpt_requests_finished_total", finish_reason=r) for r in FINISH_REASONS},
            "rejected": total("nanogpt_requests_rejected_total"), "tokens": total("nanogpt_completion_tokens_total"),
            "batched_steps": total("nanogpt_decode_batch_rows_count") - total("nanogpt_decode_batch_rows_bucket", le="1.0")}


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    log: Path
    proc: subprocess.Popen
    key: str | None = None  # the first of NANOGPT_API_KEYS, if set

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics_text(self) -> str:
        """GET /metrics, with the key when the server has keys."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + "/metrics", headers=headers), timeout=10) as r:
            return r.read().decode()

    def figures(self, model: str) -> dict:
        """figures() of /metrics: over every worker."""
        return figures(self.metrics_text(), model)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def gunicorn_server(models_dir: Path, log: Path, env: dict | None = None, args: tuple = ()):
    """gunicorn -c gunicorn_config.py web.app:app on a free port, stopped on exit (the log stays)."""
    port = free_port()
    full_env = os.environ | {"NANOGPT_MODELS_DIR": str(models_dir), "OMP_NUM_THREADS": "1"} | (env or {})
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn_config.py", "--bind", f"127.0.0.1:{port}"]
    cmd += ["--no-control-socket", *args, "web.app:app"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    keys = [k.strip() for k in full_env.get("NANOGPT_API_KEYS", "").split(",") if k.strip()]
    server = Server(f"http://127.0.0.1:{port}", log, proc, keys[0] if keys else None)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if server.get("/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer /health in 60 s:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
