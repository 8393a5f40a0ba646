"""model/hub.py: without network, every script that loads from the Hugging Face Hub fails at once
with its --input hint, instead of retrying for tens of seconds; with network, nothing changes."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT
from model.hub import probe_hub
from test_hellaswag import free_port


def test_no_answer_switches_to_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # unset for the probe; what it sets is undone after the test
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert probe_hub(timeout=2) is False and os.environ["HF_HUB_OFFLINE"] == "1"


def test_any_answer_is_network(monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert probe_hub(timeout=2) is True and os.environ["HF_HUB_OFFLINE"] == ""
    finally:
        server.shutdown()


def test_an_operators_offline_setting_asks_nothing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1")  # TEST-NET: a probe would hang until its timeout
    assert probe_hub(timeout=30) is False


@pytest.mark.parametrize("script, hint", [
    (["data_prep/prepare_dolly.py"], "--input FILE.jsonl"),
    (["data_prep/prepare_chat.py"], "--input FILE.jsonl"),
    (["data_prep/fineweb.py", "--max_tokens", "1000"], "--input FILE.txt|FILE.jsonl|FILE.parquet"),
])
def test_hub_scripts_fail_at_once_offline_with_the_input_hint(tmp_path, script, hint):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}  # no cache either
    result = subprocess.run([sys.executable, *script, "--out_dir", str(tmp_path / "out")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "(no answer: offline)" in result.stderr and hint in result.stderr
    assert "Retrying" not in result.stderr + result.stdout  # huggingface_hub's backoff never started
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
