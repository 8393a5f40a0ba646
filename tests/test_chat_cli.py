"""web/chat_cli.py as a user runs it: a subprocess reading stdin, checked against the engine itself.

Each subprocess costs ~3 s (importing torch), so one run checks several things where it can; the
flag checks and the Ctrl-C bookkeeping run in-process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT
from model.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from model.engine import SamplingParams, generate
from model.gpt import GPTConfig
from model.prompt import chat_turns, prompt_tokens
from model.tokenizer import decode
from serving import ECHO_PROMPT, ECHO_REPLY, write_echo_model, write_model
from web import chat_cli

CLI = [sys.executable, "web/chat_cli.py"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_echo_model(root, "echo")  # block_size 64
    write_model(root, "random", GPTConfig(block_size=2048, n_layer=2, n_head=2, n_embd=32))  # never says EOT
    return root


def run_cli(args: list[str], stdin: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr). Bytes are decoded here, strictly: no newline translation, and a
    broken UTF-8 sequence fails the test instead of turning into U+FFFD."""
    result = subprocess.run([*CLI, *args], input=stdin.encode(), capture_output=True, cwd=REPO_ROOT, timeout=120)
    return result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")


def answers(stdout: str) -> list[str]:
    """What the model said in each turn: stdout holds 'you> model> ANSWER\\n' per answered line."""
    turns = stdout.split("you> ")[1:]
    return [t.removeprefix("model> ").removesuffix("\n") for t in turns if t.startswith("model> ")]


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_streams_the_answer_byte_exact_and_leaves_at_end_of_input(models, quant):
    status, out, err = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0", "--quant", quant],
                               ECHO_PROMPT + "\n")
    assert status == 0, err
    assert answers(out) == [ECHO_REPLY] and "\ufffd" not in out
    assert ("int8 weights" in err) == (quant == "int8")  # the banner says what decodes


def test_multi_turn_reset_and_quit_match_the_engine_on_the_rendered_history(models):
    model = model_from_checkpoint(load_checkpoint(resolve_checkpoint(models / "random"))).eval()
    params = SamplingParams(temperature=0, max_tokens=8)
    reply = lambda messages: "".join(generate(model, prompt_tokens(chat_turns(messages)), params))  # noqa: E731
    system = {"role": "system", "content": "Be brief."}
    first = reply([system, {"role": "user", "content": "Hello there."}])
    second = reply([system, {"role": "user", "content": "Hello there."}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And again?"}])
    # the fixture can tell a second turn that saw the first from one that did not
    assert second != reply([system, {"role": "user", "content": "And again?"}])

    args = ["--checkpoint", str(models / "random"), "--temperature", "0", "--max_tokens", "8", "--system", "Be brief."]
    status, out, err = run_cli(args, "Hello there.\n\n   \nAnd again?\n/reset\nHello there.\n/quit\nnot read\n")
    assert status == 0, err
    # blank lines are not turns; after /reset the same question gets the first answer again; /quit leaves
    assert answers(out) == [first, second, first]


def test_stop_string_cuts_the_answer(models):
    status, out, err = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0", "--stop", "テ"], ECHO_PROMPT + "\n")
    assert status == 0, err
    assert answers(out) == ["日本語の"]


def test_a_full_context_drops_old_exchanges_and_a_too_long_message_is_skipped(models):
    # the echo model's context is 64 tokens: a second message of ~25 tokens pushes the first exchange out
    long, too_long = "many words here " * 4, "word " * 100
    stdin = f"first {long}\nsecond {long}\nthird {long}\n{too_long}\n/reset\n{ECHO_PROMPT}\n"
    status, out, err = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "0"], stdin)
    assert status == 0, err
    assert 'left out the oldest 1 exchange(s), asking "first many words' in err
    n = len(prompt_tokens(chat_turns([{"role": "user", "content": too_long}])))
    assert f"is {n} tokens, the model's context 64: send a shorter one" in err
    said = answers(out)
    assert len(said) == 4 and said[-1] == ECHO_REPLY  # the chat went on, and /reset made it a first turn again


def test_ctrl_c_during_an_answer_stops_it_and_returns_to_the_prompt(models):
    proc = subprocess.Popen([*CLI, "--checkpoint", str(models / "random"), "--max_tokens", "2000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        seen = b""
        while b"model> " not in seen and (chunk := proc.stdout.read1(4096)):
            seen += chunk
        # 2000 tokens take seconds: the signal lands mid-answer
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # closes stdin: after the stopped answer, end of input
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    out = (seen + out).decode()
    assert out.endswith(" [stopped]\nyou> \n") and len(answers(out)) == 1


def test_ctrl_c_keeps_the_partial_answer_in_the_conversation(monkeypatch, capsys):
    prompts = []

    def interrupted(model, prompt, params):  # an answer that Ctrl-C cuts after "Hello"
        prompts.append(decode(prompt))
        yield "Hel"
        yield "lo"
        raise KeyboardInterrupt

    lines = iter(["Hi", "Go on"])

    def typed(prompt):  # the user types two lines, then presses Ctrl-C at the prompt
        print(prompt, end="")
        if (line := next(lines, None)) is None:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(chat_cli, "generate", interrupted)
    monkeypatch.setattr("builtins.input", typed)
    model = SimpleNamespace(config=SimpleNamespace(block_size=256))  # chat only reads the context size
    try:
        chat_cli.chat(model, SamplingParams())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the chat loop")
    assert answers(capsys.readouterr().out) == ["Hello [stopped]"] * 2
    assert prompts[1] == decode(prompt_tokens(chat_turns([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Go on"},
    ])))


def test_errors_say_what_to_do(models, tmp_path, monkeypatch, capsys):
    status, _, err = run_cli(["--checkpoint", str(tmp_path / "nothing")], "")
    assert status == 2 and "model/train_gpt2.py" in err and "Traceback" not in err
    status, _, err = run_cli(["--checkpoint", str(models / "echo"), "--temperature", "5"], "")
    assert status == 2 and "--temperature: 5.0 is not in [0, 2]" in err

    # the Hub out of reach (an OSError from model/export_hf.py): a message, no traceback
    def offline(checkpoint, init_from):
        raise OSError("could not fetch config.json of 'openai-community/gpt2' from the Hugging Face Hub")

    monkeypatch.setattr(chat_cli, "load_pretrained", offline)
    assert chat_cli.main(["--init_from", "gpt2"]) == 2
    assert "error: could not fetch config.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--checkpoint", "x", *flags] for flags in [
        ["--top_p", "-1"], ["--top_p", "1.5"], ["--max_tokens", "0"], ["--top_k", "-1"],
        ["--presence_penalty", "2.5"], ["--frequency_penalty", "-3"], ["--temperature", "hot"],
        ["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"],
        ["--init_from", "gpt2"],  # both models
        ["--quant", "int4"],
    ]
] + [[]])  # no model
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        chat_cli.parse_args(argv)
    assert exit.value.code == 2 and "usage:" in capsys.readouterr().err


def test_exchanges_start_where_chat_turns_starts_a_turn():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "c"}]
    # a blank answer leaves the exchange open: "b" continues "a", as the rendering joins them into one turn
    assert chat_cli.exchange_starts(messages) == [1, 5]
    assert len(chat_turns(messages)) == 2
