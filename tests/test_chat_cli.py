"""web/chat_cli.py as a user runs it: a subprocess reading stdin."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from model.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from model.engine import SamplingParams, generate
from model.gpt import GPTConfig
from model.prompt import render_messages
from model.tokenizer import encode
from serving import ECHO_PROMPT, ECHO_REPLY, write_echo_model, write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_echo_model(root, "echo")
    write_model(root, "random", GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32))
    return root


def run_cli(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "web/chat_cli.py", *args], input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def answers(stdout: str) -> list[str]:
    """What the model said in each turn (stdout holds 'you> model> ANSWER\\n' per turn)."""
    return [part.split("\n", 1)[0] for part in stdout.split("model> ")[1:]]


def test_streams_the_answer_byte_exact(models):
    result = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0"], ECHO_PROMPT + "\n")
    assert result.returncode == 0, result.stderr
    assert answers(result.stdout) == [ECHO_REPLY] and "\ufffd" not in result.stdout


def test_multi_turn_equals_the_engine_on_the_rendered_history(models):
    model = model_from_checkpoint(load_checkpoint(resolve_checkpoint(models / "random", ""))).eval()
    params = SamplingParams(temperature=0, max_tokens=8)
    history, expected = [{"role": "system", "content": "Be brief."}], []
    for line in ["Hello there.", "And again?"]:
        history.append({"role": "user", "content": line})
        expected.append("".join(generate(model, encode(render_messages(history)), params)))
        history.append({"role": "assistant", "content": expected[-1]})
    args = ["--checkpoint", str(models / "random"), "--temperature", "0", "--max_tokens", "8", "--system", "Be brief."]
    result = run_cli(args, "Hello there.\n\nAnd again?\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert answers(result.stdout) == expected
    # /reset: the second answer is a first turn again
    result = run_cli(args, "Hello there.\n/reset\nHello there.\n")
    assert answers(result.stdout) == [expected[0], expected[0]]


def test_stop_string_cuts_the_answer(models):
    result = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0", "--stop", "テ"], ECHO_PROMPT + "\n")
    assert answers(result.stdout) == ["日本語の"]


def test_old_turns_are_dropped_when_the_context_is_full(models):
    # the echo model's context is 64 tokens: the third long message pushes the first turns out
    long = "many words here " * 4
    result = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0", "--max_tokens", "4"], f"{long}\n{long}\n{long}\n")
    assert result.returncode == 0, result.stderr
    assert len(answers(result.stdout)) == 3 and "no longer fit" in result.stderr
    result = run_cli(["--checkpoint", str(models / "echo")], "word " * 100 + "\n" + ECHO_PROMPT + "\n")
    assert result.returncode == 0 and "longer than the model's context" in result.stderr
    assert len(answers(result.stdout)) == 1  # the conversation went on


def test_errors(models, tmp_path):
    result = run_cli(["--checkpoint", str(tmp_path / "nothing")], "")
    assert result.returncode == 2 and "train_gpt2.py" in result.stderr and "Traceback" not in result.stderr
    for bad in [["--temperature", "5"], ["--top_p", "-1"], ["--max_tokens", "0"], []]:
        result = run_cli(["--checkpoint", str(models / "echo"), *bad] if bad else bad, "")
        assert result.returncode == 2 and "usage:" in result.stderr
    assert run_cli(["--checkpoint", str(models / "echo")], "").returncode == 0  # end of input: a clean exit
