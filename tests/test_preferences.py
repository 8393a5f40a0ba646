"""Preference pairs: data_prep/prepare_preferences.py (--input jsonl, hh-rlhf and ultrafeedback rows) ->
masked shards, and the PairLoader that feeds them to model/dpo.py.

The key property: in every row of a batch the targets are exactly the reply and its <|endoftext|>,
after exactly the prompt the server renders for the conversation, the chosen reply's row and the
rejected reply's row sharing that prompt.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data_prep.graded_pairs as graded_pairs
import data_prep.prepare_custom_dataset as custom
import data_prep.prepare_preferences as prefs
from conftest import REPO_ROOT
from data_prep.graded_pairs import wrong_answers
from data_prep.prepare_preferences import Pair, check_pair, hh_messages, hh_pair, ultrafeedback_pair
from eval.exact_match import load_questions
from model.checkpoint import model_state, save_checkpoint
from model.data import PairLoader
from model.engine import SamplingParams, generate_batch
from model.gpt import GPT, IGNORE_INDEX, GPTConfig
from model.pretrained import load_pretrained
from model.prompt import Turn, chat_turns, prompt_tokens, turn_messages
from model.tokenizer import EOT, decode

EOT_TEXT = "<|endoftext|>"
SYSTEM = {"role": "system", "content": "Be brief."}

# Hand-written pairs with the awkward cases: unicode (accents, combining marks, emoji incl. a ZWJ
# sequence), replies holding the template's headers and a literal "<|endoftext|>", and every form of
# prompt (a string, messages with a system prompt and earlier turns) and of reply (a string, an
# assistant message with text parts, a list of messages ending with the assistant's).
PAIRS = [
    {"prompt": "Café ou cafe\u0301 ? ☕", "chosen": "Café, s'il vous plaît 😀 — é ≠ e\u0301",
     "rejected": "Non 👩\u200d👩\u200d👧 merci."},
    {"prompt": "Echo the template.", "chosen": "### Response:\nHere is <|endoftext|> as text.\n\n### Instruction:\nmore",
     "rejected": {"role": "assistant", "content": [{"type": "text", "text": "### Response:"}, {"type": "text", "text": "no"}]}},
    {"messages": [SYSTEM, {"role": "user", "content": "Tell me about cats."},
                  {"role": "assistant", "content": "Cats are small furry animals that sleep a lot."},
                  {"role": "user", "content": "And dogs?"},
                  {"role": "assistant", "content": "Dogs are loyal animals that like to play fetch."},
                  {"role": "user", "content": "Which is better?"}],
     "chosen": [{"role": "user", "content": "Which is better?"}, {"role": "assistant", "content": "Both are great."}],
     "rejected": "I cannot say which one is better, sorry."},
    {"prompt": "  keep my spaces  ", "chosen": " yes \n", "rejected": "no\r\n"},
    {"prompt": "日本語で答えてください。", "chosen": "はい、わかりました。", "rejected": "No."},
    {"prompt": "What is 2 plus 2?", "chosen": "2 plus 2 is 4.", "rejected": "5."},
]


def reply_of(value) -> str:
    """The reply text a hand-written "chosen" or "rejected" stands for (text parts joined by newlines)."""
    if isinstance(value, list):
        value = value[-1]
    if isinstance(value, dict):
        content = value["content"]
        return content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    return value


def messages_of(pair: dict) -> list[dict]:
    return pair["messages"] if "messages" in pair else [{"role": "user", "content": pair["prompt"]}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def prep_cmd(input_path, out_dir, *args):
    return [sys.executable, "data_prep/prepare_preferences.py", "--input", str(input_path), "--out_dir", str(out_dir),
            *map(str, args)]


def run_prep(input_path, out_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(prep_cmd(input_path, out_dir, *args), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def read_manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def row_parts(x_row: list[int], y_row: list[int]) -> tuple[list[int], list[int]]:
    """(prompt tokens, target tokens) of one row of a batch, checking that the targets are one run of
    tokens at the row's end followed only by padding; ([], []) for an empty row."""
    targets = [i for i, t in enumerate(y_row) if t != IGNORE_INDEX]
    if not targets:
        return [], []
    first, last = targets[0], targets[-1]
    assert targets == list(range(first, last + 1)), "the targets are not one contiguous run"
    assert x_row[last + 1 :] == [EOT] * (len(x_row) - last - 1)  # padding only after the closing token
    assert x_row[first + 1 : last + 1] == y_row[first:last], "y is not x shifted by one on the reply"
    return x_row[: first + 1], y_row[first : last + 1]


def batch_pairs(loader: PairLoader) -> list[dict]:
    """Every real pair of one pass of an unshuffled loader, as {index, prompt, chosen, rejected, reference}
    tokens read off the batch rows; empty pairs are checked to be all padding."""
    found = []
    for _ in range(loader.num_batches()):
        x, y, pairs, reference = loader.next_batch()
        B = loader.B
        assert x.shape == y.shape and x.shape[0] == 2 * B and pairs.shape == (B,) and reference.shape == (B, 2)
        for k in range(B):
            chosen_prompt, chosen = row_parts(x[k].tolist(), y[k].tolist())
            rejected_prompt, rejected = row_parts(x[B + k].tolist(), y[B + k].tolist())
            if pairs[k] < 0:
                assert chosen == rejected == [] and torch.all(reference[k] == 0)
                continue
            assert chosen_prompt == rejected_prompt, "the chosen and rejected rows have different prompts"
            found.append({"index": int(pairs[k]), "prompt": chosen_prompt, "chosen": chosen, "rejected": rejected,
                          "reference": reference[k]})
    return found


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    proc = run_prep(write_jsonl(root / "pairs.jsonl", PAIRS), root / "out", "--val_fraction", "0.34")
    assert proc.returncode == 0, proc.stderr
    return root / "out"


def test_reply_masks_are_token_exact_and_prompts_are_what_the_server_renders(prepared):
    """Each row's targets decode to exactly its reply + <|endoftext|>, after exactly the server's prompt."""
    expected = {tuple(prompt_tokens(chat_turns(messages_of(p)))): p for p in PAIRS}
    assert len(expected) == len(PAIRS)
    seen = []
    for split in ("train", "val"):
        loader = PairLoader(prepared, split, 4, shuffle=False)
        table = torch.randn(loader.num_examples(), 2)
        loader.reference = table
        for found in batch_pairs(loader):
            pair = expected[tuple(found["prompt"])]  # the prompt is exactly the server's rendering of the messages
            assert loader.prompt_tokens(found["index"]) == found["prompt"]
            for field in ("chosen", "rejected"):
                tokens = found[field]
                assert tokens[-1] == EOT and EOT not in tokens[:-1]  # a literal "<|endoftext|>" stays text
                assert decode(tokens) == reply_of(pair[field]) + EOT_TEXT
            assert torch.equal(found["reference"], table[found["index"]])
            seen.append((split, found["index"], tuple(found["prompt"])))
    assert sorted(p for _, _, p in seen) == sorted(expected)  # every pair once, in one split or the other
    assert {s for s, _, _ in seen} == {"train", "val"}
    counts = read_manifest(prepared)["counts"]
    assert counts["train"]["kept"] + counts["val"]["kept"] == len(PAIRS)
    assert read_manifest(prepared)["kind"] == "preferences"


def test_pair_i_is_examples_2i_and_2i_plus_1_with_the_mask_on_the_replies(prepared):
    """The shard holds pair i as examples 2i (chosen) and 2i+1 (rejected), masks 1 on the reply, 2 on its end."""
    manifest = read_manifest(prepared)
    entry = next(e for e in manifest["shards"] if e["split"] == "train")
    tokens, mask = np.load(prepared / entry["file"]), np.load(prepared / entry["mask_file"])
    ends = np.flatnonzero(mask == 2) + 1
    assert len(ends) == entry["examples"] == 2 * manifest["counts"]["train"]["kept"]
    starts = np.concatenate([[0], ends[:-1]])
    examples = [(tokens[s:e].tolist(), mask[s:e].tolist()) for s, e in zip(starts, ends)]
    expected = {tuple(prompt_tokens(chat_turns(messages_of(p)))): p for p in PAIRS}
    for (chosen, chosen_mask), (rejected, rejected_mask) in zip(examples[::2], examples[1::2]):
        n = chosen_mask.index(1)
        pair = expected[tuple(chosen[:n])]
        assert rejected[:n] == chosen[:n] and rejected_mask.index(1) == n
        for t, m, field in ((chosen, chosen_mask, "chosen"), (rejected, rejected_mask, "rejected")):
            assert m == [0] * n + [1] * (len(t) - n - 1) + [2]
            assert decode(t[n:]) == reply_of(pair[field]) + EOT_TEXT


# ----------------------------------------------------------------------------- Hub rows

def hh_transcript(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))


HH_ROW = {"chosen": hh_transcript("Hi there.", "Hello! How can I help?", "What is 2+2?\nBe quick.", "It is 4."),
          "rejected": hh_transcript("Hi there.", "Hello! How can I help?", "What is 2+2?\nBe quick.", "Go away.")}


def test_hh_rlhf_rows_become_the_shared_dialogue_and_the_two_last_replies():
    """An hh-rlhf row's transcripts become user/assistant messages and the two differing last replies."""
    assert hh_messages(HH_ROW["chosen"]) == [
        {"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?\nBe quick."}, {"role": "assistant", "content": "It is 4."}]
    assert hh_pair(HH_ROW) == {
        "messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "What is 2+2?\nBe quick."}],
        "chosen": "It is 4.", "rejected": "Go away."}
    pair = check_pair(hh_pair(HH_ROW))
    assert pair == Pair((Turn("Hi there.", (), "Hello! How can I help?"), Turn("What is 2+2?\nBe quick.")),
                        "It is 4.", "Go away.")


@pytest.mark.parametrize("row, why", [
    ({"chosen": hh_transcript("Hi.", "Hello!", "2+2?", "4."), "rejected": hh_transcript("Hi.", "Go away.", "2+2?", "5.")},
     "differ before their last reply"),
    ({"chosen": hh_transcript("Hi.", "Hello!", "2+2?"), "rejected": hh_transcript("Hi.", "Hello!", "2+2?")},
     "does not end with an Assistant"),
    ({"chosen": "It is 4.", "rejected": "It is 5."}, "not an hh-rlhf transcript"),
    ({"chosen": "\n\nAssistant: Hi.\n\nHuman: 2+2?\n\nAssistant: 4.",
      "rejected": "\n\nAssistant: Hi.\n\nHuman: 2+2?\n\nAssistant: 5."}, "does not start with a Human: turn"),
])
def test_hh_rlhf_rows_that_make_no_pair_raise_value_error(row, why):
    """Transcripts that differ before the last reply, do not end with a reply, or are no dialogue make no pair."""
    with pytest.raises(ValueError, match=why):
        check_pair(hh_pair(row))


def test_ultrafeedback_rows_become_the_prompt_and_the_two_replies():
    """An ultrafeedback_binarized row's message lists become the prompt messages and the two reply texts."""
    row = {"prompt": "Name a prime number.", "prompt_id": "abc", "score_chosen": 9.0, "score_rejected": 2.0,
           "chosen": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7 is prime."}],
           "rejected": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "9."}]}
    mapped = ultrafeedback_pair(row)
    assert mapped["messages"] == [{"role": "user", "content": "Name a prime number."}]
    assert check_pair(mapped) == Pair((Turn("Name a prime number."),), "7 is prime.", "9.")


def test_hub_sets_are_read_offline_with_bad_rows_skipped_and_counted(tmp_path, monkeypatch, capsys):
    """With the Hub stubbed, hh-rlhf rows become shards and a row that makes no pair is counted as skipped."""
    splits = {"train": [HH_ROW] * 3 + [{"chosen": hh_transcript("a", "b"), "rejected": hh_transcript("c", "d")}],
              "test": [HH_ROW]}
    asked = []

    def fake_hub(dataset, split, data_dir=None):
        asked.append((dataset, split, data_dir))
        return splits[split]

    monkeypatch.setattr(prefs, "load_hub_dataset", fake_hub)
    out = tmp_path / "out"
    assert prefs.main(["--out_dir", str(out)]) == 0
    assert asked == [("Anthropic/hh-rlhf", "train", "helpful-base"), ("Anthropic/hh-rlhf", "test", "helpful-base")]
    manifest = read_manifest(out)
    assert manifest["counts"]["invalid_skipped"] == 1
    assert manifest["counts"]["train"]["kept"] == 3 and manifest["counts"]["val"]["kept"] == 1
    assert "Anthropic/hh-rlhf train row 3" in capsys.readouterr().out
    found = batch_pairs(PairLoader(out, "val", 1, shuffle=False))
    assert [decode(f["chosen"]) for f in found] == ["It is 4." + EOT_TEXT]
    assert [decode(f["rejected"]) for f in found] == ["Go away." + EOT_TEXT]


# ----------------------------------------------------------------------------- length policy

LONG_REPLY = "This reply goes on and on about nothing in particular, far past the length allowed for one example. " * 2
SHORT = [{"prompt": f"What is {a} plus {a}?", "chosen": f"It is {2 * a}.", "rejected": "No idea."} for a in range(6)]


def test_long_pairs_lose_their_oldest_turns_or_are_dropped_and_both_are_counted(tmp_path):
    """With a small --max_len, a chat loses its two oldest turns (system prompt kept); a too-long last turn is dropped."""
    multi_turn = PAIRS[2]  # a prompt of 75 tokens, its longer reply 11: only the last turn fits 40
    too_long = {"prompt": "x", "chosen": LONG_REPLY, "rejected": "Short."}
    out = tmp_path / "out"
    proc = run_prep(write_jsonl(tmp_path / "pairs.jsonl", [*SHORT[:3], multi_turn, too_long, *SHORT[3:]]), out,
                    "--max_len", "40", "--val_fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    counts = read_manifest(out)["counts"]
    total = {k: counts["train"][k] + counts["val"][k] for k in counts["train"]}
    assert (total["pairs"], total["kept"], total["dropped"]) == (8, 7, 1)
    assert (total["shortened"], total["turns_left_out"]) == (1, 2)
    assert "1 lost 2 earlier turns" in proc.stdout and "1 dropped as too long" in proc.stdout
    # the server's prompt for the conversation without its two oldest turns, the system prompt kept
    shortened = prompt_tokens(chat_turns([SYSTEM, {"role": "user", "content": "Which is better?"}]))
    found = [f for split in ("train", "val") for f in batch_pairs(PairLoader(out, split, 2, shuffle=False))]
    assert len(found) == 7
    kept = [f for f in found if decode(f["chosen"]) == "Both are great." + EOT_TEXT]
    assert len(kept) == 1 and kept[0]["prompt"] == shortened
    assert decode(kept[0]["rejected"]) == reply_of(multi_turn["rejected"]) + EOT_TEXT
    assert all(len(f["prompt"]) + len(f[r]) <= 40 for f in found for r in ("chosen", "rejected"))
    assert not any(LONG_REPLY in decode(f["chosen"]) for f in found)


# ----------------------------------------------------------------------------- bad input

GOOD_LINES = [json.dumps(p, ensure_ascii=False) for p in SHORT]
BAD_LINES = [
    ('{"prompt": "Hi", "chosen": "Hello."}', 'no "rejected" field'),
    ('{"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}',
     'give the prompt as "prompt" (a string) or as "messages"'),
    ('{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}', '"chosen" and "rejected" are the same reply'),
    ('{"prompt": "Hi", "chosen": "Hello.", "rejected": "  "}', '"rejected" is empty'),
    ('{"prompt": "Hi", "chosen": "Hello.", "rejected": ', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], '
     '"chosen": "a", "rejected": "b"}', "the last message is the assistant's"),
]


@pytest.mark.parametrize("bad_line, why", BAD_LINES, ids=["no-rejected", "prompt-and-messages", "same-replies",
                                                       "empty-reply", "not-json", "ends-with-assistant"])
def test_a_bad_line_stops_the_run_naming_file_line_and_why(tmp_path, capsys, bad_line, why):
    """One bad line: its file:line and why, exit 2, and no out_dir."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([*GOOD_LINES[:2], "", bad_line, *GOOD_LINES[2:]]) + "\n", encoding="utf-8")  # line 4
    out = tmp_path / "out"
    assert prefs.main(["--input", str(path), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert any(f"{path}:4: " in line and why in line for line in err.splitlines()), err
    assert err.startswith("error: ") and "--skip_invalid" in err and f"{path}:1:" not in err
    assert not out.exists()


def test_the_script_lists_every_bad_line_leaves_an_earlier_out_dir_alone_and_skip_invalid_writes_the_rest(tmp_path):
    """The CLI exits 2 naming every bad line, an existing out_dir stays byte-identical; --skip_invalid writes the rest."""
    path = tmp_path / "in.jsonl"
    lines = [*GOOD_LINES[:3], *(bad for bad, _ in BAD_LINES), *GOOD_LINES[3:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_prep(path, tmp_path / "fresh")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{len(BAD_LINES)} invalid record(s), nothing written" in proc.stderr
    for lineno in range(4, 4 + len(BAD_LINES)):  # each line's why: the test above
        assert f"{path}:{lineno}: " in proc.stderr
    assert f"{path}:{3 + len(BAD_LINES) + 1}:" not in proc.stderr and f"{path}:3:" not in proc.stderr
    assert not (tmp_path / "fresh").exists()

    earlier = tmp_path / "earlier"
    assert run_prep(write_jsonl(tmp_path / "good.jsonl", PAIRS), earlier).returncode == 0
    before = file_hashes(earlier)
    proc = run_prep(path, earlier)
    assert proc.returncode == 2 and f"{path}:4: " in proc.stderr
    assert file_hashes(earlier) == before

    proc = run_prep(path, earlier, "--skip_invalid", "--val_fraction", "0.34")
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {len(BAD_LINES)} invalid record(s)" in proc.stdout
    counts = read_manifest(earlier)["counts"]
    assert counts["invalid_skipped"] == len(BAD_LINES) and counts["records"] == len(lines)
    assert counts["train"]["kept"] + counts["val"]["kept"] == len(SHORT)
    found = [f for split in ("train", "val") for f in batch_pairs(PairLoader(earlier, split, 2, shuffle=False))]
    assert sorted(decode(f["chosen"]) for f in found) == sorted(p["chosen"] + EOT_TEXT for p in SHORT)


# ----------------------------------------------------------------------------- the right script for the data

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("sft") / "step_000010.pt"
    save_checkpoint(model_state(model) | {"kind": "sft", "step": 10}, path)
    return path


def test_preference_pairs_are_refused_by_instruction_tuning(prepared, tiny_checkpoint, tmp_path):
    """model/finetune_dolly.py on preference pairs exits 2 and names model/dpo.py."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "model/finetune_dolly.py", "--data_dir", str(prepared), "--out_dir", str(out),
                           "--pretrained_checkpoint", str(tiny_checkpoint), "--device", "cpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "holds preference pairs" in proc.stderr and "model/dpo.py" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_instruction_data_is_refused_by_dpo(tiny_checkpoint, tmp_path):
    """model/dpo.py on instruction data exits 2 naming the right scripts; prepare_preferences.py will not write over it."""
    records = [{"instruction": f"What is {a} plus {a}?", "response": f"{2 * a}."} for a in range(4)]
    write_jsonl(tmp_path / "records.jsonl", records)
    assert custom.main([str(tmp_path / "records.jsonl"), "--out_dir", str(tmp_path / "sft_data")]) == 0
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "model/dpo.py", "--data_dir", str(tmp_path / "sft_data"), "--out_dir", str(out),
                           "--sft_checkpoint", str(tiny_checkpoint), "--device", "cpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "holds instruction data" in proc.stderr and "model/finetune_dolly.py" in proc.stderr
    assert "prepare_preferences.py" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    # nor does prepare_preferences.py write pairs over that instruction data
    before = file_hashes(tmp_path / "sft_data")
    proc = run_prep(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "sft_data")
    assert proc.returncode == 2 and "not preference pairs: choose another --out_dir" in proc.stderr
    assert file_hashes(tmp_path / "sft_data") == before


def test_wrong_answers_are_distinct_non_blank_and_capped():
    """graded_pairs.wrong_answers: right answers (whitespace aside), blank ones and repeats are left out, in order."""
    answers = ["7", " 8", "", "8 ", "  ", "9", "7 ", "10"]
    assert wrong_answers("7", answers, 5) == [" 8", "9", "10"]
    assert wrong_answers("7", answers, 2) == [" 8", "9"]
    assert wrong_answers("7", ["7", " 7\n"], 3) == []


GRADED_RECORDS = [
    {"instruction": "What is 2 plus 5?", "context": "", "response": "7", "task": "add"},
    {"instruction": "Sort 9, 2, 5.", "context": "", "response": "2, 5, 9"},
]
GRADED_CHATS = [
    {"messages": [{"role": "user", "content": "Which is larger, 3 or 8?"}, {"role": "assistant", "content": "8"},
                  {"role": "user", "content": "And 2 or 6?"}, {"role": "assistant", "content": "6"}]},
]


def write_questions(tmp_path: Path, records: list[dict], chats: list[dict]) -> list[Path]:
    """One file per format, as the demo's instructions and conversations are."""
    return [write_jsonl(tmp_path / "records.jsonl", records)] + ([write_jsonl(tmp_path / "chats.jsonl", chats)] if chats else [])


def greedy_answers(checkpoint: Path, files: list[Path], max_tokens: int) -> list[str]:
    """The checkpoint's greedy answer to each question of the files, as graded_pairs.py computes it."""
    model, _ = load_pretrained(checkpoint)
    model.requires_grad_(False)
    return generate_batch(model, [prompt_tokens(list(q.turns)) for q in load_questions(files)],
                          SamplingParams(max_tokens=max_tokens, temperature=0))


def test_graded_pairs_pair_the_right_answer_with_the_model_s_own_wrong_ones(tiny_checkpoint, tmp_path):
    """Each pair: the question's conversation as messages, the expected answer chosen, a wrong answer of
    the model rejected (its greedy one first); and prepare_preferences.py takes the file as it is."""
    files, out = write_questions(tmp_path, GRADED_RECORDS, GRADED_CHATS), tmp_path / "pairs.jsonl"
    greedy = greedy_answers(tiny_checkpoint, files, 6)
    assert graded_pairs.main(["--checkpoint", str(tiny_checkpoint), "--data", *map(str, files), "--out", str(out),
                              "--samples", "3", "--max_tokens", "6", "--pairs_per_question", "2"]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    questions = load_questions(files)
    by_prompt: dict[str, list[dict]] = {}
    for p in pairs:
        by_prompt.setdefault(json.dumps(p["messages"]), []).append(p)
    assert len(by_prompt) == len(questions) == 3  # a random model gets every question wrong
    for q, answer, record in zip(questions, greedy, GRADED_RECORDS + GRADED_CHATS):
        mine = by_prompt[json.dumps(turn_messages(list(q.turns)))]
        assert 1 <= len(mine) <= 2
        assert all(p["chosen"] == q.expected and p["rejected"].strip() and p["rejected"].strip() != q.expected
                   for p in mine)
        if answer.strip():
            assert mine[0]["rejected"] == answer
        assert all(p.get("task") == record.get("task") for p in mine)
    assert turn_messages(list(questions[2].turns)) == GRADED_CHATS[0]["messages"][:-1]
    proc = run_prep(out, tmp_path / "prepared")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "prepared")["counts"]["records"] == len(pairs)


def test_graded_pairs_with_every_answer_right_write_nothing(tiny_checkpoint, tmp_path, capsys):
    """A model that answers every question right gives no pair: exit 2, no file, and what to change."""
    files = write_questions(tmp_path, GRADED_RECORDS, [])
    greedy = greedy_answers(tiny_checkpoint, files, 4)
    records = [r | {"response": a} for r, a in zip(GRADED_RECORDS, greedy) if a.strip()]
    assert records, "the tiny model gave only blank answers"
    files, out = write_questions(tmp_path, records, []), tmp_path / "pairs.jsonl"
    assert graded_pairs.main(["--checkpoint", str(tiny_checkpoint), "--data", *map(str, files), "--out", str(out),
                              "--samples", "0", "--max_tokens", "4"]) == 2
    assert "no pairs to write" in capsys.readouterr().err and not out.exists()
