"""demo.py (make demo) end to end in a shortened configuration: every stage runs from nothing, the server
it ends with answers held-out questions exactly as eval/exact_match.py scored them, and a second run
reuses every stage and serves again. A busy port is refused before any work."""

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from browser import chromium, need_chromium, until
from conftest import REPO_ROOT
from model.prompt import chat_turns, prompt_tokens
from serving import gunicorn_server
from test_hellaswag import free_port

# a shorter, narrower run than make demo's (which is measured in the README): minutes on 2 CPU cores
SHORT = ["--n_layer", "4", "--n_embd", "64", "--pretrain_steps", "150", "--finetune_steps", "1000", "--finetune_batch_size", "16",
         "--graded_questions", "300", "--dpo_steps", "8"]


class Demo:
    """demo.py in a subprocess, its output read line by line in a thread (so a wait can time out)."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "demo.py", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line that contains text; fails with the whole output if none comes in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        pytest.fail(f"demo.py never printed {text!r}:\n" + "".join(self.lines[-80:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its gunicorn
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def as_chat(record: dict) -> list[dict]:
    """A held-out record's question as chat messages: its context as the system message (the template's
    Context); a held-out conversation's messages before its expected last reply."""
    if "messages" in record:
        return record["messages"][:-1]
    system = [{"role": "system", "content": record["context"]}] if record["context"] else []
    return system + [{"role": "user", "content": record["instruction"]}]


def expected(record: dict) -> str:
    return record["messages"][-1]["content"] if "messages" in record else record["response"]


def ask(client: OpenAI, record: dict) -> str:
    reply = client.chat.completions.create(model="tuned", messages=as_chat(record), temperature=0, max_tokens=32)
    return reply.choices[0].message.content


@dataclass
class FirstRun:
    """The shortened demo, run once for the module: it serves until a test stops it."""

    work: Path
    runs: Path
    port: int
    args: list[str]
    demo: Demo
    records: list[dict]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    work, runs, port = tmp / "data", tmp / "runs", free_port()
    args = ["--work_dir", str(work), "--runs_dir", str(runs), "--port", str(port), *SHORT]
    demo = Demo(args)
    try:
        demo.wait_for(f"serving: http://127.0.0.1:{port}", timeout=900)
        records = [json.loads(line) for name in ("heldout.jsonl", "heldout_chat.jsonl")
                   for line in (work / "source" / name).read_text().splitlines()]
        yield FirstRun(work, runs, port, args, demo, records)
    finally:
        assert demo.stop() == 0


def test_demo_runs_every_stage_and_serves_the_tuned_model(first_run):
    runs, port, records = first_run.runs, first_run.port, first_run.records
    output = "".join(first_run.demo.lines)
    for stage in ("demo_corpus.py", "fineweb.py", "train_gpt2.py", "prepare_custom_dataset.py",
                  "finetune_dolly.py", "graded_pairs.py", "prepare_preferences.py", "dpo.py", "exact_match.py",
                  "report.py", "gunicorn"):
        assert stage in output
    for run in ("pretrained", "tuned", "dpo"):
        assert (runs / run / "report.md").is_file() and (runs / run / "loss.png").is_file()
    assert (runs / "tuned" / "metric_exact_match.png").is_file()  # held-out accuracy over fine-tuning
    assert (runs / "dpo" / "reward_accuracy.png").is_file() and (runs / "dpo" / "rewards.png").is_file()
    # the pairs are the tuned model's own wrong answers to training questions, against the right ones
    pairs = [json.loads(line) for line in (first_run.work / "graded_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"].strip() != p["rejected"].strip() for p in pairs)
    source = first_run.work / "source"
    asked = {r["instruction"] for r in map(json.loads, (source / "instructions.jsonl").read_text().splitlines())}
    asked |= {[m for m in c["messages"] if m["role"] == "user"][-1]["content"]
              for c in map(json.loads, (source / "conversations.jsonl").read_text().splitlines())}
    assert all(p["messages"][-1]["content"] in asked for p in pairs)

    assert {r["split"] for r in records} == {"new operands", "new phrasing", "follow-up"}
    scored = json.loads((runs / "exact_match.json").read_text())["models"]
    assert scored["tuned"]["accuracy"] > scored["pretrained"]["accuracy"]
    assert set(scored["tuned"]["by_turns"]) == {"single-turn", "multi-turn"}
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    served = [ask(client, r) for r in records]
    # the server's greedy answers, follow-ups included, are the evaluation's, and the ones it scored right are right
    assert served == scored["tuned"]["answers"]
    right = [r for r, a in zip(records, served) if a.strip() == expected(r)]
    assert len(right) == scored["tuned"]["correct"] >= 0.25 * len(records)
    assert {"new operands", "new phrasing"} <= {r["split"] for r in right}
    # a chat longer than the tiny model's 128-token context goes on: the demo's server drops its oldest turns
    long_chat = [m for r in records[:10] for m in [*as_chat(r), {"role": "assistant", "content": expected(r)}]]
    reply = client.chat.completions.create(model="tuned", messages=long_chat + as_chat(records[10]), max_tokens=8)
    full = len(prompt_tokens(chat_turns(long_chat + as_chat(records[10]))))
    assert full > 128 > reply.usage.prompt_tokens


def test_the_printed_snippets_run_as_printed(first_run):
    output = "".join(first_run.demo.lines)
    curl = re.search(r"^curl .*?\n  -d '.*?'$", output, re.S | re.M).group(0)
    python = re.search(r"^\S+ - <<'EOF'\n.*?^EOF$", output, re.S | re.M).group(0)
    assert python.startswith(".venv/bin/python - <<'EOF'") or python.startswith(sys.executable)
    for snippet in (curl, python):
        result = subprocess.run(["bash", "-c", snippet], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip(), (snippet, result.stderr)
    assert json.loads(subprocess.run(["bash", "-c", curl], cwd=REPO_ROOT, capture_output=True, text=True,
                                     timeout=60).stdout)["model"] == "dpo"


def test_the_serving_command_and_the_page_pick_the_last_tuned_model(first_run, tmp_path):
    """What the demo prints (and the README gives) to serve its models again: the page that server
    shows opens on the preference-tuned model, marks the pretrained one as a base model, and answers a
    held-out question as the evaluation scored it."""
    need_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    shown = next(line for line in first_run.demo.lines if line.startswith("$ NANOGPT_BIND="))
    words = shown[2:].split()
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert env.pop("NANOGPT_BIND") == f"127.0.0.1:{first_run.port}"
    assert env == {"NANOGPT_MODELS_DIR": str(first_run.runs), "NANOGPT_DROP_OLD_TURNS": "1"}
    assert shown.rstrip().endswith("gunicorn -c gunicorn_config.py web.app:app")
    scored = json.loads((first_run.runs / "exact_match.json").read_text())["models"]["dpo"]
    question, answer = next((r, a) for r, a in zip(first_run.records, scored["answers"])
                            if "instruction" in r and not r["context"] and a.strip() == r["response"])
    with gunicorn_server(first_run.runs, tmp_path / "gunicorn.log", {"NANOGPT_DROP_OLD_TURNS": "1"}) as server, \
            chromium(tmp_path / "profile") as browser:
        assert "models directory" in server.log_text() and "tuned (sft)" in server.log_text()
        assert "dpo (dpo)" in server.log_text()
        browser.get(server.url + "/")
        until(browser, lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3, "model list")
        picker = Select(browser.find_element(By.ID, "model"))
        assert picker.first_selected_option.get_attribute("value") == "dpo"
        labels = {o.get_attribute("value"): o.text for o in picker.options}
        assert "(base model" in labels["pretrained"] and "base model" not in labels["dpo"] + labels["tuned"]
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        browser.find_element(By.ID, "prompt").send_keys(question["instruction"])
        browser.find_element(By.ID, "send").click()
        until(browser, lambda d: d.find_element(By.ID, "send").is_enabled() and
              d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant"), "an answer")
        reply = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant").get_property("textContent")
        assert reply == answer


def test_a_second_run_reuses_every_stage_and_serves_again(first_run):
    """Last of the module's demo tests: it stops the first run."""
    assert first_run.demo.stop() == 0
    started = time.monotonic()
    again = Demo(first_run.args)
    try:
        again.wait_for("serving:", timeout=300)
        output = "".join(again.lines)
        # two prepared data sets, the graded pairs and their shards, and three finished runs
        assert output.count(": reused") == 7
        assert "train_gpt2.py" not in output and "finetune_dolly.py" not in output and "model/dpo.py" not in output
        client = OpenAI(base_url=f"http://127.0.0.1:{first_run.port}/v1", api_key="unused")
        scored = json.loads((first_run.runs / "exact_match.json").read_text())["models"]["tuned"]
        assert ask(client, first_run.records[0]) == scored["answers"][0]
    finally:
        assert again.stop() == 0
    print(f"second run reached serving in {time.monotonic() - started:.0f} s")


def test_a_busy_port_is_refused_before_any_work(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "demo.py", "--work_dir", str(tmp_path / "data"), "--runs_dir",
                                 str(tmp_path / "runs"), "--port", str(port)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and f"PORT={port + 1}" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
