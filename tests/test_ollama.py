"""The Ollama Modelfile that model/export_gguf.py writes beside a GGUF file: FROM the file, our
context length, and a TEMPLATE that renders conversations exactly as our server does, checked by
executing it with Go's text/template on messages collated as Ollama collates them
(tests/ollama_render.go). Ollama itself is in no registry this project installs from, so its
template engine stands in for it; CI installs Debian's Go."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_CONFIG
from model.prompt import OLLAMA_TEMPLATE, chat_turns, message_text
from test_prompt import TEMPLATE_CHATS


def need_go() -> str:
    """The go command; tests skip without it, except under CI, which installs it."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI needs Go for the Ollama template test: apt-get install golang-go")
        pytest.skip("no go command: install Go (Debian: golang-go) to check the Ollama template")
    return go


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """render(template, messages) -> the text Ollama's Go template engine makes of them."""
    go = need_go()
    work = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GO111MODULE": "off"}
    binary = work / "ollama_render"
    subprocess.run([go, "build", "-o", str(binary), str(REPO_ROOT / "tests" / "ollama_render.go")], env=env, check=True,
                   timeout=300)

    def run(template: str, messages: list[dict]) -> str:
        path = work / "template.txt"
        path.write_text(template, encoding="utf-8")
        proc = subprocess.run([str(binary), str(path)], input=json.dumps(messages).encode(), capture_output=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode("utf-8")

    return run


def as_ollama_sends(messages: list[dict]) -> list[dict]:
    """Messages as Ollama's API holds them: string contents. Blank system, developer and assistant
    messages are left out: chat_turns drops them, but Ollama joins a message to a neighbour of its
    role before the template sees it (and a Go template cannot trim), so there they differ by design."""
    out = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
    return [m for m in out if m["role"] in ("user", "tool") or m["content"].strip()]


@pytest.mark.parametrize("messages", TEMPLATE_CHATS, ids=range(len(TEMPLATE_CHATS)))
def test_the_ollama_template_renders_exactly_our_turns(render, messages):
    messages = as_ollama_sends(messages)
    turns = chat_turns(messages)  # as the server maps a request's messages
    expected = "".join(t.prompt() + ("" if t.reply is None else t.reply + "<|endoftext|>") for t in turns)
    assert render(OLLAMA_TEMPLATE, messages) == expected


def modelfile_template(text: str) -> str:
    """The TEMPLATE of a Modelfile, unquoted as Ollama's parser unquotes a \"\"\"-quoted value."""
    (line,) = [line for line in text.splitlines() if line.startswith("TEMPLATE ")]
    value = line.removeprefix("TEMPLATE ").strip()
    assert value.startswith('"""') and value.endswith('"""') and '"""' not in value[3:-3]
    return value[3:-3]


def test_the_export_writes_a_modelfile_beside_the_file(trained_tiny, tmp_path, render):
    _, _, checkpoint = trained_tiny
    out = tmp_path / "tiny-q8_0.gguf"
    proc = subprocess.run([sys.executable, "model/export_gguf.py", "--checkpoint", str(checkpoint), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modelfile = tmp_path / "tiny-q8_0.Modelfile"
    assert f"ollama create {checkpoint.parent.name} -f {modelfile}" in proc.stdout
    text = modelfile.read_text(encoding="utf-8")
    assert "FROM ./tiny-q8_0.gguf\n" in text  # Ollama resolves it from the Modelfile's folder
    assert f"PARAMETER num_ctx {TINY_CONFIG['block_size']}\n" in text and 'PARAMETER stop "<|endoftext|>"\n' in text
    # our server's sampling: Ollama's own defaults (top_k 40, top_p 0.9, repeat_penalty 1.1) change greedy answers
    assert all(f"PARAMETER {p}\n" in text for p in ("temperature 0.7", "top_k 0", "top_p 1", "repeat_penalty 1"))
    assert modelfile_template(text) == OLLAMA_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count on from 3:"}]
    assert render(modelfile_template(text), messages) == "### Instruction:\nCount on from 3:\n\n### Context:\nBe brief.\n\n### Response:\n"
    # elsewhere, FROM names the file by its absolute path; "none" writes no Modelfile
    elsewhere = tmp_path / "modelfiles" / "Modelfile"
    assert subprocess.run([sys.executable, "model/export_gguf.py", "--checkpoint", str(checkpoint), "--out", str(out),
                           "--modelfile", str(elsewhere)], cwd=REPO_ROOT, timeout=120).returncode == 0
    assert f"FROM {out.resolve()}\n" in elsewhere.read_text(encoding="utf-8")
    out.unlink()
    modelfile.unlink()
    assert subprocess.run([sys.executable, "model/export_gguf.py", "--checkpoint", str(checkpoint), "--out", str(out),
                           "--modelfile", "none"], cwd=REPO_ROOT, timeout=120).returncode == 0
    assert out.exists() and not modelfile.exists()
