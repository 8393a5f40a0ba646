"""Conversations, from the data file to the served answer: OpenAI messages and ShareGPT records are
prepared so that every trained reply follows exactly the tokens the server renders for the history
before it (checked through the server's own request path), bad lines are refused by file:line with
nothing written, long conversations lose their oldest turns, and a model tuned on conversations
answers a follow-up through the official openai client.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

import data_prep.prepare_chat as prepare_chat
import data_prep.prepare_custom_dataset as custom
import web.scheduler
from conftest import REPO_ROOT
from data_prep.instruction_shards import encode_conversation
from eval.exact_match import main as exact_match_main
from model.checkpoint import checkpoint_path, model_state, save_checkpoint
from model.data import load_masked_split, padded_batch
from model.gpt import GPT, GPTConfig
from model.prompt import Turn, chat_turns, fit_turns, prompt_tokens, render_turns
from model.shards import MASK_END
from model.tokenizer import EOT, encode, get_tokenizer
from serving import gunicorn_server, write_model
from test_finetune import pretrained, run_finetune  # noqa: F401  (a fixture)
from test_train import log_records
from web.app import ServerConfig, create_app

SYSTEM = {"role": "system", "content": "You answer in one short line. Réponds brièvement."}

# hand-written: a system prompt, three user turns, a reply kept as history (weight 0), text parts,
# a name, unicode that BPE splits inside characters, and replies holding the template's headers
CONVERSATIONS = [
    {"messages": [
        SYSTEM,
        {"role": "user", "content": "What is 3 plus 4?", "name": "ana"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": [{"type": "text", "text": "And 2 more"}, {"type": "text", "text": "than that?"}]},
        {"role": "assistant", "content": "9 — neuf 🙂", "weight": 0},
        {"role": "user", "content": "Say it in Japanese."},
        {"role": "assistant", "content": "九です。\n### Instruction:\n<|endoftext|>", "weight": 1},
    ]},
    {"messages": [
        {"role": "developer", "content": "Sort numbers."},
        {"role": "user", "content": "Sort 9, 2, 5."},
        {"role": "assistant", "content": "2, 5, 9"},
        {"role": "user", "content": "Now the other way round."},
        {"role": "assistant", "content": "9, 5, 2"},
        {"role": "user", "content": "Thanks!"},  # nothing after it to train: left out
    ]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Family? 👩\u200d👩\u200d👧"},
                  {"role": "assistant", "content": "One family.", "weight": 0},
                  {"role": "user", "content": "Again."}, {"role": "assistant", "content": "  Still one.\r\n"}]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def examples_of(out_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(tokens, mask) of every example of both splits, cut at each mask value MASK_END."""
    result = []
    for split in ("train", "val"):
        tokens, mask = load_masked_split(out_dir, split, "instructions")
        ends = np.flatnonzero(mask == MASK_END) + 1
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            result.append((tokens[start:end].tolist(), mask[start:end].tolist()))
    return result


def trained_spans(tokens: list[int], mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained tokens."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def expected_replies(conversation: list[dict]) -> list[tuple[list[dict], str]]:
    """(the messages before it, the reply) of every reply that must be trained, by hand."""
    out = []
    for i, m in enumerate(conversation):
        if m["role"] == "assistant" and m.get("weight", 1) == 1:
            out.append((conversation[:i], m["content"]))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("chats")
    path = write_jsonl(root / "chats.jsonl", CONVERSATIONS)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert custom.main([str(path), "--out_dir", str(root / "out"), "--val_fraction", "0.25"]) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input is only read
    return root / "out"


@pytest.fixture(scope="module")
def server_prompts(tmp_path_factory):
    """prompt(messages) -> the tokens the server's own request path submits to its engine."""
    models = tmp_path_factory.mktemp("models")
    write_model(models, "m", GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32))
    client = create_app(ServerConfig(models_dir=str(models))).test_client()
    submitted = []
    original = web.scheduler.Scheduler.submit

    def recording(self, prompt, params):
        submitted.append(list(prompt))
        return original(self, prompt, params)

    def prompt(messages: list[dict]) -> list[int]:
        web.scheduler.Scheduler.submit = recording
        try:
            response = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 1})
        finally:
            web.scheduler.Scheduler.submit = original
        assert response.status_code == 200, response.get_json()
        return submitted.pop()

    return prompt


def test_trained_tokens_are_exactly_the_replies_after_the_servers_own_prompt(prepared, server_prompts):
    examples = examples_of(prepared)
    assert len(examples) == len(CONVERSATIONS)  # every conversation fits: one example each
    found = []
    for tokens, mask in examples:
        assert tokens[-1] == EOT and mask[-1] == MASK_END
        spans = trained_spans(tokens, mask)
        conversation = next(c["messages"] for c in CONVERSATIONS
                            if [r for _, r in expected_replies(c["messages"])][-1].encode()
                            == get_tokenizer().decode_bytes(tokens[spans[-1][0] : spans[-1][1] - 1]))
        replies = expected_replies(conversation)
        assert len(spans) == len(replies)
        for (start, end), (history, reply) in zip(spans, replies):
            # nothing but the reply and its closing token is trained...
            assert tokens[start:end] == encode(reply) + [EOT]
            # ...after exactly what the server sends the model for the messages before it, byte for byte
            served = server_prompts(history)
            assert tokens[:start] == served
            assert get_tokenizer().decode_bytes(tokens[:start]) == get_tokenizer().decode_bytes(served)
        found.append(conversation)
    assert sorted(map(json.dumps, found)) == sorted(json.dumps(c["messages"]) for c in CONVERSATIONS)


def test_sharegpt_gives_the_same_shards_as_the_same_chats_in_openai_format(prepared, tmp_path):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    plain = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
              {"role": "assistant", "content": "Bye 👋"}]] * 3 + [[{"role": "user", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]]
    openai_path = write_jsonl(tmp_path / "o.jsonl", [{"messages": c} for c in plain])
    share_path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                                       for m in c]} for c in plain])
    for path, out in ((openai_path, "o"), (share_path, "s")):
        assert custom.main([str(path), "--out_dir", str(tmp_path / out), "--val_fraction", "0.25"]) == 0
    for split in ("train", "val"):
        a, b = load_masked_split(tmp_path / "o", split, "instructions"), load_masked_split(tmp_path / "s", split, "instructions")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_one_sequence_trains_each_reply_exactly_as_one_example_per_reply_would():
    """The packing choice: a conversation is one row, and each reply's loss equals its loss alone
    after the prompt the server renders for its history."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    turns = chat_turns(CONVERSATIONS[0]["messages"], weights=True)
    (tokens, mask), = encode_conversation(turns, 256)[0]
    x, y = torch.tensor([tokens[:-1]]), torch.tensor([tokens[1:]])
    packed = F.cross_entropy(model(x)[0][0].float(), y[0], reduction="none")[torch.tensor(mask[1:]) > 0]
    alone = []
    for history, reply in expected_replies(CONVERSATIONS[0]["messages"]):
        row = prompt_tokens(chat_turns(history)) + encode(reply) + [EOT]
        n_reply = len(encode(reply)) + 1
        logits = model(torch.tensor([row[:-1]]))[0][0].float()
        alone.append(F.cross_entropy(logits, torch.tensor(row[1:]), reduction="none")[-n_reply:])
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def long_conversation(n: int) -> list[Turn]:
    return [Turn(f"Question number {i}: " + "and more words " * (i % 3), (("system", "Be brief."),) if i == 0 else (),
                 f"Answer {i} " + "blah " * (i % 4)) for i in range(n)]


@pytest.mark.parametrize("max_len", [40, 64, 90, 150, 10_000])
def test_long_conversations_drop_their_oldest_turns_as_the_server_does(max_len):
    turns = long_conversation(8)
    examples, counts = encode_conversation(turns, max_len)
    trained = []
    for tokens, mask in examples:
        assert len(tokens) <= max_len and tokens[-1] == EOT and mask[-1] == MASK_END
        for start, end in trained_spans(tokens, mask):
            trained.append((tokens[:start], tokens[start:end]))
    assert counts["replies"] == len(trained) and counts["dropped"] == 8 - len(trained)
    for prompt, reply in trained:
        j = next(j for j, t in enumerate(turns) if encode(t.reply) + [EOT] == reply)
        # the history is what fit_turns (the server's NANOGPT_DROP_OLD_TURNS) keeps for a prompt of this budget
        kept, dropped = fit_turns(turns[: j + 1], max_len)
        assert prompt + reply == render_turns(kept)[0]
        assert dropped == 0 or "Be brief." in get_tokenizer().decode(prompt)  # the system prompt stays
    if max_len == 10_000:
        assert len(examples) == 1 and counts["turns_left_out"] == 0
    if max_len == 90:
        assert counts["turns_left_out"] > 0 and len(examples) > 1 and counts["dropped"] == 0


def test_a_reply_whose_own_turn_is_too_long_has_its_context_cut_or_is_dropped():
    system = "Answer in one word. " * 20
    turns = [Turn("Name a colour.", (("system", system),), "Blue."), Turn("Another?", (), "Red."),
             Turn("word " * 80, (), "Far too long a question to fit.")]
    examples, counts = encode_conversation(turns, 40)
    # "Red." keeps no earlier turn, but the system prompt moves to it, so its context is cut too
    assert (counts["truncated"], counts["dropped"], counts["replies"]) == (2, 1, 2)
    texts = [get_tokenizer().decode(tokens) for tokens, _ in examples]
    assert len(texts) == 2 and [t.endswith(reply + "<|endoftext|>") for t, reply in zip(texts, ("Blue.", "Red."))] == [True, True]
    for text in texts:  # the start of the context, kept
        assert "### Context:\nAnswer in one word." in text and system not in text
    for tokens, mask in examples:
        assert len(tokens) <= 40 and tokens[-1] == EOT and mask[-1] == MASK_END


# ----------------------------------------------------------------------------- bad input

GOOD = json.dumps(CONVERSATIONS[2])
BAD = [
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message to train on"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "no assistant message to train on"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[0].role is 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]},
     "messages[1].weight is 0.5: it must be 0 (not trained on) or 1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "y"}]}, "messages[0].content: content part 0 is 'image_url'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     "messages[1] is an empty reply"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "messages[0].content is required"),
    ({"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "x"}]},
     "messages[0] is an assistant message with no user message before it"),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "a record in ShareGPT conversations format, in a file of OpenAI messages"),
    ({"instruction": "x", "response": "y"}, "a record in instruction records format, in a file of OpenAI messages"),
    ("not json", "not valid JSON"),
]


@pytest.mark.parametrize("bad, why", BAD)
def test_bad_conversation_lines_stop_the_run_naming_file_line_and_why(tmp_path, capsys, bad, why):
    path = tmp_path / "in.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text("\n".join([GOOD, GOOD, bad_line, GOOD]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert custom.main([str(path), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if f"{path}:3:" in line)
    assert why in line, err
    assert f"{path}:1:" not in err and f"{path}:4:" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("bad, why", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from is 'bot': expected one of system, human, gpt"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]}, "conversations[0].value is int"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}, "conversations[1] is an empty reply"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant message to train on in conversations"),
])
def test_bad_sharegpt_lines_are_named_in_sharegpt_terms(tmp_path, capsys, bad, why):
    good = json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([good, json.dumps(bad), good]) + "\n", encoding="utf-8")
    assert custom.main([str(path), "--out_dir", str(tmp_path / "out")]) == 2
    assert any(f"{path}:2:" in line and why in line for line in capsys.readouterr().err.splitlines())
    assert not (tmp_path / "out").exists()
    # --skip_invalid leaves the bad line out, counted
    assert custom.main([str(path), "--out_dir", str(tmp_path / "out"), "--skip_invalid", "--val_fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["invalid_skipped"] == 1


def test_cli_exits_2_on_a_bad_conversation(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [CONVERSATIONS[2], {"messages": [{"role": "user", "content": "x"}]}])
    proc = subprocess.run([sys.executable, "data_prep/prepare_custom_dataset.py", str(path), "--out_dir",
                           str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{path}:2:" in proc.stderr and "no assistant message to train on" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_chat_reads_a_local_copy_with_a_limit_and_says_what_to_do_offline(tmp_path, capsys):
    path = write_jsonl(tmp_path / "smol.jsonl", [c | {"source": "test"} for c in CONVERSATIONS] * 2)
    out = tmp_path / "out"
    assert prepare_chat.main(["--input", str(path), "--out_dir", str(out), "--limit", "6", "--val_fraction", "0.5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["producer"] == "data_prep/prepare_chat.py" and manifest["counts"]["records"] == 6
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "data_prep/prepare_chat.py", "--out_dir", str(tmp_path / "hub")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 2 and "HuggingFaceTB/smol-smoltalk" in proc.stderr and "--input FILE.jsonl" in proc.stderr


# ----------------------------------------------------------------------------- serving


def test_a_long_conversation_is_400_by_default_and_loses_its_oldest_turns_with_the_setting(tmp_path):
    write_model(tmp_path, "m", GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} with some words"}, {"role": "assistant", "content": "ok"}]
    messages = [SYSTEM, *history, {"role": "user", "content": "last one?"}]
    body = {"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0}
    strict = create_app(ServerConfig(models_dir=str(tmp_path))).test_client().post("/v1/chat/completions", json=body)
    assert strict.status_code == 400 and strict.get_json()["error"]["code"] == "context_length_exceeded"
    dropping = create_app(ServerConfig(models_dir=str(tmp_path), drop_old_turns=True)).test_client()
    response = dropping.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    kept, dropped = fit_turns(chat_turns(messages), 64 - 8)
    assert dropped > 0 and response.get_json()["usage"]["prompt_tokens"] == len(prompt_tokens(kept))
    assert ServerConfig.from_env({"NANOGPT_DROP_OLD_TURNS": "1"}).drop_old_turns
    assert not ServerConfig.from_env({"NANOGPT_DROP_OLD_TURNS": "0"}).drop_old_turns


FOLLOW_UPS = [  # the same follow-up, a different answer: only the earlier turn tells which
    ([("What is 3 plus 4?", "7"), ("And 2 more than that?", "9")]),
    ([("What is 1 plus 1?", "2"), ("And 2 more than that?", "4")]),
    ([("Sort 9, 2, 5.", "2, 5, 9"), ("Now the other way round.", "9, 5, 2")]),
    ([("Sort 3, 8, 1.", "1, 3, 8"), ("Now the other way round.", "8, 3, 1")]),
]


def as_messages(exchanges) -> list[dict]:
    return [m for q, a in exchanges for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def write_follow_up_model(models_dir: Path, name: str) -> None:
    """A tiny model tuned (seconds) on FOLLOW_UPS as data prep encodes them, with the masked loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    x, y = padded_batch([encode_conversation(chat_turns(as_messages(c), weights=True), 64)[0][0] for c in FOLLOW_UPS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(400):  # 300 were enough on the dev VM: the rest is margin
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(model_state(model) | {"step": 400}, checkpoint_path(models_dir / name, 400))


def test_a_model_tuned_on_conversations_answers_the_follow_up_through_the_openai_client(tmp_path):
    write_follow_up_model(tmp_path / "models", "chat")
    with gunicorn_server(tmp_path / "models", tmp_path / "gunicorn.log") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for conversation in FOLLOW_UPS:
            *history, (question, expected) = conversation
            messages = [*as_messages(history), {"role": "user", "content": question}]
            reply = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=8)
            assert reply.choices[0].message.content == expected
            assert reply.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="chat", messages=[*as_messages(FOLLOW_UPS[0][:1]), {"role": "user"}])
        assert e.value.status_code == 400 and e.value.body["param"] == "messages[2].content"


# ----------------------------------------------------------------------------- tuning and scoring


def arithmetic_chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 5)
        chats.append({"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"And {c} more than that?"}, {"role": "assistant", "content": str(a + b + c)}]})
    return chats


def test_prepare_then_tune_on_conversations_lowers_held_out_reply_loss(tmp_path, pretrained):  # noqa: F811
    path = write_jsonl(tmp_path / "chats.jsonl", arithmetic_chats(200, 0))
    proc = subprocess.run([sys.executable, "data_prep/prepare_custom_dataset.py", str(path), "--out_dir",
                           str(tmp_path / "data"), "--max_len", "65"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "earlier turns left out" in proc.stdout
    heldout = write_jsonl(tmp_path / "heldout.jsonl", arithmetic_chats(6, 1))
    run_finetune(tmp_path / "data", tmp_path / "run", "--max_steps", "30", "--total_batch_size", "8", "--eval_every", "30",
                 "--save_every", "30", "--pretrained_checkpoint", str(pretrained), "--exact_match_data", str(heldout))
    evals = [r for r in log_records(tmp_path / "run") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    scored = [r for r in log_records(tmp_path / "run") if "exact_match" in r]
    assert scored and "exact_match_multi_turn" in scored[-1]


def test_exact_match_scores_the_last_reply_of_held_out_conversations(tmp_path, capsys):
    write_follow_up_model(tmp_path, "chat")
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": as_messages(c), "task": "follow"} for c in FOLLOW_UPS]
                       + [{"messages": as_messages(FOLLOW_UPS[0][:1]), "task": "first"}])
    assert exact_match_main(["--checkpoint", str(tmp_path / "chat"), "--data", str(data), "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert "chat: exact match 5/5 = 100.0%" in printed
    assert "multi-turn 4/4 = 100.0% | single-turn 1/1 = 100.0%" in printed
    assert "Q: What is 3 plus 4? -> 7 | And 2 more than that?   (expected: 9)" in printed
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert exact_match_main(["--checkpoint", str(tmp_path / "chat"), "--data", str(data)]) == 2
    assert f"{data}:1: no assistant message to train on" in capsys.readouterr().err
