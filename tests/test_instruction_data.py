"""Instruction data: records -> masked shards (data_prep/instruction_shards.py and its two CLIs), and
the InstructionLoader that feeds them to fine-tuning, down to the masked loss of a padded batch.

The key property: in every prepared example the loss mask is 1 on exactly the response tokens and
the closing <|endoftext|>, and 0 on exactly the prompt of model/prompt.py, whatever the text holds.
"""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_prep.prepare_custom_dataset as custom
import data_prep.prepare_dolly as dolly
from conftest import REPO_ROOT, make_shards
from data_prep.instruction_shards import Record, encode_record, split_records
from model.data import InstructionLoader, load_masked_split
from model.gpt import GPT, IGNORE_INDEX, GPTConfig
from model.prompt import render_prompt
from model.shards import DataError, sha256_file
from model.tokenizer import EOT, decode, encode

EOT_TEXT = "<|endoftext|>"

# Hand-written records with the awkward cases: with and without context (missing, null, blank), CJK,
# emoji (incl. a ZWJ sequence and a flag), combining marks, CRLF and tabs, text around the headers,
# and responses holding the template's own headers and a literal "<|endoftext|>".
RECORDS = [
    {"instruction": "Name a colour.", "response": "Blue."},
    {"instruction": "Summarize the text.", "context": "Cats sleep for most of the day.", "response": "Cats nap."},
    {"instruction": "Say hello in Chinese.", "context": None, "response": "你好，世界！😀"},
    {"instruction": "Cafe\u0301 or café?", "context": "e\u0301 (e + U+0301) vs é — “quotes”, ß, Ω",
     "response": "Both: e\u0301 ≠ é 🇫🇷"},
    {"instruction": "Echo the template.",
     "response": "### Response:\nHere is <|endoftext|> as text.\n\n### Instruction:\nmore"},
    {"instruction": "  keep my spaces  ", "context": "   ", "response": " yes \n"},
    {"instruction": "Family?", "context": "a\r\nb\tc", "response": "👩\u200d👩\u200d👧 is one family.\r\n"},
    {"instruction": "日本語で答えてください。", "context": "### Context:\n<|endoftext|>", "response": "はい、わかりました。"},
]


def expected_example(record: dict) -> tuple[str, str]:
    """(prompt text, masked-in text) that a record must become."""
    return render_prompt(record["instruction"], record.get("context")), record["response"] + EOT_TEXT


def write_jsonl(path: Path, records, *, ensure_ascii=False) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    return path


def prep(input_path, out_dir, *args) -> int:
    return custom.main([str(input_path), "--out_dir", str(out_dir), *map(str, args)])


def read_manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


def load_split_shards(out_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and mask of one split, read with numpy straight from the files the manifest lists."""
    tokens, masks = [], []
    for entry in read_manifest(out_dir)["shards"]:
        if entry["split"] != split:
            continue
        t = np.load(out_dir / entry["file"])
        m = np.load(out_dir / entry["mask_file"])
        assert t.dtype == np.uint16 and m.dtype == np.uint8 and t.shape == m.shape == (entry["tokens"],)
        assert sha256_file(out_dir / entry["file"]) == entry["sha256"]
        assert sha256_file(out_dir / entry["mask_file"]) == entry["mask_sha256"]
        tokens.append(t)
        masks.append(m)
    if not tokens:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint8)
    return np.concatenate(tokens), np.concatenate(masks)


def split_examples(tokens: np.ndarray, mask: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """(masked-out tokens, masked-in tokens) of every single-turn example, cutting after each mask 2
    (the closing EOT of an example)."""
    assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    ends = np.flatnonzero(mask == 2) + 1
    assert np.all(tokens[ends - 1] == EOT), "an example ends with something else than EOT"
    assert len(tokens) == 0 or ends[-1] == len(tokens), "the split does not end with an example's end"
    examples, start = [], 0
    for end in ends:
        t, m = tokens[start:end].tolist(), [min(v, 1) for v in mask[start:end].tolist()]
        n_prompt = m.index(1)
        assert m == [0] * n_prompt + [1] * (len(m) - n_prompt), "mask is not prompt zeros then response ones"
        examples.append((t[:n_prompt], t[n_prompt:]))
        start = end
    return examples


def decoded_examples(out_dir: Path, split: str) -> list[tuple[str, str]]:
    return [(decode(p), decode(r)) for p, r in split_examples(*load_split_shards(out_dir, split))]


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """RECORDS prepared by prepare_custom_dataset.py with a val split; the input's hash before and after."""
    root = tmp_path_factory.mktemp("prepared")
    path = write_jsonl(root / "records.jsonl", RECORDS)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert prep(path, root / "out", "--val_fraction", "0.25") == 0
    after = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"input": path, "out": root / "out", "hash_before": before, "hash_after": after}


# ----------------------------------------------------------------------------- masks and text


def test_mask_covers_exactly_the_response_and_closing_eot(prepared):
    out = prepared["out"]
    by_prompt = {render_prompt(r["instruction"], r.get("context")): r for r in RECORDS}
    assert len(by_prompt) == len(RECORDS)
    seen = []
    for split in ("train", "val"):
        for prompt_tokens, response_tokens in split_examples(*load_split_shards(out, split)):
            prompt_text = decode(prompt_tokens)
            record = by_prompt[prompt_text]  # the masked-out tokens are exactly a whole rendered prompt
            assert decode(response_tokens) == record["response"] + EOT_TEXT
            # token for token: the literal "<|endoftext|>" in a response is ordinary text, the only EOT is the last
            assert prompt_tokens == encode(prompt_text)
            assert response_tokens == encode(record["response"]) + [EOT]
            assert EOT not in prompt_tokens and response_tokens.count(EOT) == 1
            seen.append(prompt_text)
    assert Counter(seen) == Counter(by_prompt.keys())  # every record exactly once across train and val


def test_unicode_survives_exactly(prepared):
    examples = decoded_examples(prepared["out"], "train") + decoded_examples(prepared["out"], "val")
    assert sorted(examples) == sorted(expected_example(r) for r in RECORDS)
    text = "".join(p + r for p, r in examples)
    assert "\ufffd" not in text
    for piece in ("你好，世界！😀", "Cafe\u0301", "e\u0301 ≠ é 🇫🇷", "👩\u200d👩\u200d👧", "a\r\nb\tc", "はい"):
        assert piece in text


def test_blank_context_renders_without_context_section(prepared):
    examples = decoded_examples(prepared["out"], "train") + decoded_examples(prepared["out"], "val")
    prompts = [p for p, _ in examples]
    assert "### Instruction:\n  keep my spaces  \n\n### Response:\n" in prompts
    assert "### Instruction:\nName a colour.\n\n### Response:\n" in prompts


def test_manifest_counts_and_split_sizes(prepared):
    manifest = read_manifest(prepared["out"])
    counts = manifest["counts"]
    assert manifest["kind"] == "instructions" and manifest["producer"] == "data_prep/prepare_custom_dataset.py"
    assert manifest["source"] == str(prepared["input"].resolve())
    assert counts["records"] == len(RECORDS) and counts["invalid_skipped"] == 0
    assert counts["val"]["examples"] == round(len(RECORDS) * 0.25) == 2
    assert counts["train"]["examples"] == len(RECORDS) - 2
    for split in ("train", "val"):
        tokens, mask = load_split_shards(prepared["out"], split)
        assert counts[split]["tokens"] == len(tokens)
        assert counts[split]["response_tokens"] == int((mask > 0).sum())
        assert counts[split]["truncated"] == counts[split]["dropped"] == 0
        assert len(split_examples(tokens, mask)) == counts[split]["examples"]


def test_input_file_is_only_read(prepared):
    assert prepared["hash_before"] == prepared["hash_after"]


def test_unicode_line_separators_inside_strings_survive(tmp_path, capsys):
    # U+2028/U+2029/U+0085 are legal raw inside JSON strings (json.dumps(ensure_ascii=False) leaves them
    # raw), and are not line ends in jsonl, where only "\n" separates records.
    records = [{"instruction": f"Item {k}", "response": f"one\u2028two\u2029three\x85four {k}"} for k in range(4)]
    path = write_jsonl(tmp_path / "seps.jsonl", records)
    assert prep(path, tmp_path / "out", "--val_fraction", "0.25") == 0, capsys.readouterr().err
    examples = decoded_examples(tmp_path / "out", "train") + decoded_examples(tmp_path / "out", "val")
    assert sorted(examples) == sorted(expected_example(r) for r in records)


def test_ascii_escaped_input_gives_the_same_shards(prepared, tmp_path):
    path = write_jsonl(tmp_path / "escaped.jsonl", RECORDS, ensure_ascii=True)
    assert prep(path, tmp_path / "out", "--val_fraction", "0.25") == 0
    for split in ("train", "val"):
        a, b = load_split_shards(prepared["out"], split), load_split_shards(tmp_path / "out", split)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- the split


def numbered_records(n, context_every=3):
    return [{"instruction": f"Task number {k}.", "response": " ".join(["word"] * (k % 13 + 1)) + f" #{k}",
             **({"context": f"Context for {k}: " + "lorem " * (k % 7)} if k % context_every == 0 else {})}
            for k in range(n)]


def npy_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.npy"))}


def test_same_seed_gives_identical_shards_and_other_seeds_other_splits(tmp_path):
    records = numbered_records(20)
    path = write_jsonl(tmp_path / "r.jsonl", records)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert prep(path, tmp_path / name, "--val_fraction", "0.25", "--seed", seed) == 0
    assert npy_bytes(tmp_path / "a") == npy_bytes(tmp_path / "b") and npy_bytes(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()

    val = {name: sorted(decoded_examples(tmp_path / name, "val")) for name in "ac"}
    train = {name: sorted(decoded_examples(tmp_path / name, "train")) for name in "ac"}
    assert val["a"] != val["c"]
    for name in "ac":
        assert len(val[name]) == 5 and len(train[name]) == 15
        assert not set(val[name]) & set(train[name])
        assert sorted(val[name] + train[name]) == sorted(expected_example(r) for r in records)


@pytest.mark.parametrize("n, fraction, n_val", [(20, 0.25, 5), (10, 0.01, 1), (7, 0.5, 4), (6, 0.25, 2), (3, 0.5, 2)])
def test_val_size_is_rounded_share_of_records_and_at_least_one(n, fraction, n_val):
    records = [Record(f"i{k}", "", f"r{k}") for k in range(n)]
    splits = split_records(records, fraction, seed=3)
    assert n_val == max(1, round(n * fraction))
    assert len(splits["val"]) == n_val and len(splits["train"]) == n - n_val
    assert sorted(r.instruction for r in splits["val"] + splits["train"]) == sorted(r.instruction for r in records)
    assert split_records(records, fraction, seed=3) == splits  # the split depends on the data and seed only


def test_too_few_records_for_both_splits_is_refused(tmp_path, capsys):
    path = write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    assert prep(path, tmp_path / "out", "--val_fraction", "0.5") == 2
    assert "cannot be split into train and val" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_val_fraction_zero_is_refused_because_tuning_needs_a_val_split(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    with pytest.raises(SystemExit) as exit_info:
        prep(path, tmp_path / "out", "--val_fraction", "0")
    assert exit_info.value.code == 2
    assert "--val_fraction must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input

GOOD = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:4]]
BAD_LINES = [
    ('{"instruction": "unclosed', "not valid JSON"),
    ('{"response": "no instruction"}', 'no "instruction" field'),
    ('{"instruction": "no response"}', 'no "response" field'),
    ('{"instruction": "x", "context": 5, "response": "y"}', '"context" is int, not a string'),
    ('{"instruction": "x", "response": ""}', '"response" is empty'),
    ('{"instruction": "x", "response": " \\n "}', '"response" is empty'),
    ('{"instruction": "", "response": "y"}', '"instruction" is empty'),
    ('{"instruction": ["x"], "response": "y"}', '"instruction" is list, not a string'),
    ('{"instruction": null, "response": "y"}', "not null"),
    ('["instruction", "response"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("bad_line, why", BAD_LINES)
def test_bad_record_stops_the_run_naming_file_line_and_reason(tmp_path, capsys, bad_line, why):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([GOOD[0], GOOD[1], "", bad_line, GOOD[2]]) + "\n", encoding="utf-8")  # bad: line 4
    out = tmp_path / "out"
    assert prep(path, out, "--val_fraction", "0.25") == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if f"{path}:4:" in line)
    assert why in line
    assert err.startswith("error: ") and "--skip_invalid" in err and "Traceback" not in err
    assert f"{path}:1:" not in err and f"{path}:5:" not in err  # good lines are not blamed
    assert not out.exists()  # no shards, no manifest: nothing written at all


def test_every_bad_record_is_listed_and_skip_invalid_leaves_them_out(tmp_path, capsys):
    lines = GOOD[:2] + [bad for bad, _ in BAD_LINES[:5]] + GOOD[2:]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert prep(path, tmp_path / "strict", "--val_fraction", "0.25") == 2
    err = capsys.readouterr().err
    assert "5 invalid record(s), nothing written" in err
    for lineno, (_, why) in enumerate(BAD_LINES[:5], start=3):
        assert any(f"{path}:{lineno}:" in line and why in line for line in err.splitlines())
    assert not (tmp_path / "strict").exists()

    out = tmp_path / "lenient"
    assert prep(path, out, "--val_fraction", "0.25", "--skip_invalid") == 0
    printed = capsys.readouterr().out
    assert "skipping 5 invalid record(s)" in printed and f"{path}:3:" in printed
    counts = read_manifest(out)["counts"]
    assert counts["invalid_skipped"] == 5 and counts["records"] == len(lines)
    assert counts["train"]["examples"] + counts["val"]["examples"] == 4
    examples = decoded_examples(out, "train") + decoded_examples(out, "val")
    assert sorted(examples) == sorted(expected_example(r) for r in RECORDS[:4])


def test_skip_invalid_with_no_valid_record_is_an_error(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("not json\n{}\n")
    assert prep(path, tmp_path / "out", "--skip_invalid") == 2
    assert "no valid records" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_and_non_utf8_input_files(tmp_path, capsys):
    assert prep(tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert f"{tmp_path / 'missing.jsonl'}: no such file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"instruction": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    assert prep(latin1, tmp_path / "out") == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_exits_2_on_bad_input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD[0] + "\n" + '{"instruction": "x"}\n')
    proc = subprocess.run([sys.executable, "data_prep/prepare_custom_dataset.py", str(path), "--out_dir",
                           str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{path}:2:" in proc.stderr and 'no "response" field' in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--val_fraction", "1"], ["--val_fraction", "-0.1"], ["--max_len", "4"],
                                  ["--max_len", "64", "--shard_size", "32"]])
def test_bad_settings_exit_2(tmp_path, args):
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    with pytest.raises(SystemExit) as exc:
        prep(path, tmp_path / "out", *args)
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- length policy

LONG_CONTEXT = "The quick brown fox jumps over the lazy dog. " * 30
SHORT = Record("Summarize.", LONG_CONTEXT, "A fox jumps.")


def test_example_that_fits_is_kept_whole_up_to_max_len_exactly():
    tokens, mask, outcome = encode_record(SHORT, 10_000)
    prompt = encode(render_prompt(SHORT.instruction, SHORT.context))
    assert outcome == "kept"
    assert tokens == prompt + encode(SHORT.response) + [EOT]
    assert mask == [0] * len(prompt) + [1] * (len(encode(SHORT.response)) + 1)
    assert encode_record(SHORT, len(tokens)) == (tokens, mask, "kept")


@pytest.mark.parametrize("context", [LONG_CONTEXT, "中文字符和表情😀" * 40, "e\u0301" * 300])
@pytest.mark.parametrize("cut", [1, 5, 100])
def test_long_context_is_cut_keeping_its_start_and_the_whole_response(context, cut):
    record = Record("Summarize.", context, "A fox jumps. <|endoftext|> ### Response:")
    full, _, _ = encode_record(record, 10_000)
    max_len = len(full) - cut
    tokens, mask, outcome = encode_record(record, max_len)
    response = encode(record.response) + [EOT]
    assert outcome == "truncated"
    assert len(tokens) <= max_len and len(tokens) == len(mask)
    n_prompt = len(tokens) - len(response)
    assert tokens[n_prompt:] == response and mask == [0] * n_prompt + [1] * len(response)
    prompt = decode(tokens[:n_prompt])
    head, tail = render_prompt(record.instruction, "X").split("X")
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept = prompt[len(head) : len(prompt) - len(tail)]
    assert kept.strip() and len(kept) < len(context) and context.startswith(kept)  # a non-blank start of it
    assert "\ufffd" not in kept
    assert tokens[:n_prompt] == encode(render_prompt(record.instruction, kept))


@pytest.mark.parametrize("context", [LONG_CONTEXT, "中文字符和表情😀" * 20, "  \n  leading blank, then text " * 10])
def test_every_max_len_gives_a_fitting_example_or_a_drop(context):
    record = Record("Summarize.", context, "A fox jumps.")
    response = encode(record.response) + [EOT]
    full, _, _ = encode_record(record, 10_000)
    dropped = False
    for max_len in range(len(full) - 1, 7, -1):
        tokens, mask, outcome = encode_record(record, max_len)
        if outcome == "dropped":
            assert tokens == mask == []
            dropped = True
            continue
        assert not dropped, f"kept at --max_len {max_len} after being dropped at a larger one"
        assert outcome == "truncated" and len(tokens) <= max_len
        assert tokens[len(tokens) - len(response):] == response and sum(mask) == len(response)
    assert dropped


def test_instruction_and_response_that_fit_are_kept_without_their_context():
    # the policy: dropped only "if it cannot fit even with no context left (the instruction and
    # response alone are too long)"; here they fit exactly, with no room for a Context section
    alone = encode(render_prompt(SHORT.instruction)) + encode(SHORT.response) + [EOT]
    tokens, mask, outcome = encode_record(SHORT, len(alone))
    assert outcome == "truncated"
    assert tokens == alone and sum(mask) == len(encode(SHORT.response)) + 1


@pytest.mark.parametrize("record", [
    Record("Tell a long story.", "", "once upon a time " * 40),
    Record("Tell a long story.", "some context to cut", "once upon a time " * 40),
    Record("word " * 60, "context", "short"),
])
def test_example_too_long_without_any_context_is_dropped(record):
    assert encode_record(record, 32) == ([], [], "dropped")


def test_cli_cuts_and_drops_by_max_len_and_counts_both(tmp_path, capsys):
    max_len = 64
    records = numbered_records(8, context_every=100)
    records[2]["context"] = LONG_CONTEXT  # cut
    records[5]["response"] = "far too long " * 30  # dropped
    path = write_jsonl(tmp_path / "r.jsonl", records)
    out = tmp_path / "out"
    assert prep(path, out, "--val_fraction", "0.25", "--max_len", max_len) == 0
    counts = read_manifest(out)["counts"]
    assert counts["train"]["truncated"] + counts["val"]["truncated"] == 1
    assert counts["train"]["dropped"] + counts["val"]["dropped"] == 1
    assert counts["train"]["examples"] + counts["val"]["examples"] == 7
    printed = capsys.readouterr().out
    assert "to fit --max_len 64: 0 earlier turns left out" in printed and "with context cut" in printed
    examples = []
    for split in ("train", "val"):
        for prompt_tokens, response_tokens in split_examples(*load_split_shards(out, split)):
            assert len(prompt_tokens) + len(response_tokens) <= max_len
            examples.append((decode(prompt_tokens), decode(response_tokens)))
    responses = Counter(r for _, r in examples)
    assert responses == Counter(r["response"] + EOT_TEXT for k, r in enumerate(records) if k != 5)
    cut = next(p for p, r in examples if r == records[2]["response"] + EOT_TEXT)
    assert cut.startswith(render_prompt(records[2]["instruction"], "The quick brown fox")[:60])
    assert len(cut) < len(render_prompt(records[2]["instruction"], LONG_CONTEXT))
    # and the loader accepts it for a model whose context is max_len - 1
    InstructionLoader(out, "train", 2, block_size=max_len - 1)


def test_every_val_example_dropped_is_an_error_that_writes_nothing(tmp_path, capsys):
    records = [{"instruction": "Q", "response": "short"}] * 3 + [{"instruction": "Q", "response": "long " * 100}]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    seed = next(s for s in range(100)
                if split_records([Record("", "", r["response"]) for r in records], 0.25, s)["val"][0].response
                != "short")
    out = tmp_path / "out"
    assert prep(path, out, "--val_fraction", "0.25", "--max_len", "32", "--seed", seed) == 2
    assert "every val example was dropped" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.npy"))  # nothing written, as for a bad record


def test_failed_rerun_leaves_the_earlier_preparation_intact(tmp_path, capsys):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", numbered_records(8))
    assert prep(good, out, "--val_fraction", "0.25") == 0
    before = file_hashes(out)
    # a second preparation into the same directory that fails after tokenizing (its val split is all too long)
    records = [{"instruction": "Q", "response": f"short {k}"} for k in range(3)]
    records.append({"instruction": "Q", "response": "long " * 100})
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    seed = next(s for s in range(100)
                if split_records([Record("", "", r["response"]) for r in records], 0.25, s)["val"][0].response
                .startswith("long"))
    assert prep(bad, out, "--val_fraction", "0.25", "--max_len", "32", "--seed", seed) == 2
    capsys.readouterr()
    assert file_hashes(out) == before
    load_masked_split(out, "train", "instructions")


def test_rerun_removes_shards_the_new_manifest_does_not_list(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", numbered_records(20))
    out = tmp_path / "out"
    assert prep(path, out, "--val_fraction", "0.25", "--max_len", "32", "--shard_size", "40") == 0
    many = sorted(p.name for p in out.glob("*.npy"))
    assert len(many) > 4
    assert prep(path, out, "--val_fraction", "0.25") == 0
    assert sorted(p.name for p in out.glob("*.npy")) == [
        "train_000000.npy", "train_000000_mask.npy", "val_000000.npy", "val_000000_mask.npy"]
    assert len(decoded_examples(out, "train")) == 15


def test_small_shards_never_split_an_example(tmp_path):
    records = numbered_records(20)
    path = write_jsonl(tmp_path / "r.jsonl", records)
    out = tmp_path / "out"
    assert prep(path, out, "--val_fraction", "0.25", "--shard_size", "60", "--max_len", "60") == 0
    manifest = read_manifest(out)
    for entry in manifest["shards"]:
        tokens, mask = np.load(out / entry["file"]), np.load(out / entry["mask_file"])
        assert tokens[-1] == EOT and mask[-1] == 2 and len(tokens) <= 60
        assert len(split_examples(tokens, mask)) == entry["examples"]
    examples = decoded_examples(out, "train") + decoded_examples(out, "val")
    assert sorted(examples) == sorted(expected_example(r) for r in records)


# ----------------------------------------------------------------------------- Dolly, other data in out_dir


def test_prepare_dolly_reads_a_local_jsonl_and_ignores_category(prepared, tmp_path):
    categories = ["open_qa", "summarization", "creative_writing", "brainstorming"]
    dolly_records = [{"instruction": r["instruction"], "context": r.get("context") or "", "response": r["response"],
                      "category": categories[k % 4]} for k, r in enumerate(RECORDS)]
    path = write_jsonl(tmp_path / "dolly.jsonl", dolly_records)
    out = tmp_path / "out"
    assert dolly.main(["--input", str(path), "--out_dir", str(out), "--val_fraction", "0.25"]) == 0
    manifest = read_manifest(out)
    assert manifest["producer"] == "data_prep/prepare_dolly.py" and manifest["kind"] == "instructions"
    examples = decoded_examples(out, "train") + decoded_examples(out, "val")
    assert sorted(examples) == sorted(expected_example(r) for r in RECORDS)
    assert not any(c in p + r for p, r in examples for c in categories)
    # the same records give the same shards as prepare_custom_dataset.py
    assert npy_bytes(out) == npy_bytes(prepared["out"])


def test_prepare_dolly_bad_record_exits_2(tmp_path, capsys):
    path = tmp_path / "dolly.jsonl"
    path.write_text(GOOD[0] + "\n" + '{"instruction": "x", "context": "", "response": "", "category": "open_qa"}\n')
    assert dolly.main(["--input", str(path), "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and '"response" is empty' in err
    assert not (tmp_path / "out").exists()


def test_pretraining_data_directory_is_refused_and_left_untouched(tmp_path, capsys):
    pre = make_shards(tmp_path / "pre", np.arange(1000) % 500, shard_size=300)
    before = file_hashes(pre)
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    assert prep(path, pre, "--val_fraction", "0.25") == 2
    err = capsys.readouterr().err
    assert "data_prep/fineweb.py" in err and "not instruction data" in err and "--out_dir" in err
    assert file_hashes(pre) == before
    assert dolly.main(["--input", str(path), "--out_dir", str(pre)]) == 2
    assert file_hashes(pre) == before


def test_instruction_loader_refuses_pretraining_data(tmp_path):
    pre = make_shards(tmp_path / "pre", np.arange(1000) % 500, shard_size=300)
    with pytest.raises(DataError, match="not instruction data"):
        InstructionLoader(pre, "train", 2)


# ----------------------------------------------------------------------------- InstructionLoader

N_LOADER = 50  # 40 train, 10 val at --val_fraction 0.2


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory):
    """Records of varied length (some with context); each example's expected (prompt, targets) tokens."""
    root = tmp_path_factory.mktemp("loader")
    records = numbered_records(N_LOADER)
    path = write_jsonl(root / "r.jsonl", records)
    assert prep(path, root / "out", "--val_fraction", "0.2", "--max_len", "65") == 0
    counts = read_manifest(root / "out")["counts"]
    assert counts["train"]["examples"] == 40 and counts["val"]["examples"] == 10
    assert counts["train"]["truncated"] == counts["train"]["dropped"] == 0
    expected = {}
    for r in records:
        prompt = encode(render_prompt(r["instruction"], r.get("context")))
        response = encode(r["response"]) + [EOT]
        expected[tuple(prompt + response)[:-1]] = (prompt, response)  # keyed by the example's x row
    return root / "out", expected


def row_examples(x, y, expected):
    """The example (its x tokens) in each row of a batch, None for an empty row, checking x and y of each."""
    found = []
    width = x.shape[1]
    for xr, yr in zip(x.tolist(), y.tolist()):
        n = xr.index(EOT) if EOT in xr else width  # x holds no EOT but padding: the closing EOT is never in x
        if n == 0:
            assert yr == [IGNORE_INDEX] * width
            found.append(None)
            continue
        key = tuple(xr[:n])
        prompt, response = expected[key]
        assert xr[n:] == [EOT] * (width - n)
        assert yr == [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX] * (width - n)
        found.append(key)
    return found


def collect_epoch(loader, expected):
    seen, padding = [], 0
    for _ in range(loader.num_batches()):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[0] == loader.B
        rows = row_examples(x, y, expected)
        assert x.shape[1] == max(len(k) for k in rows if k is not None)  # padded to the longest row only
        padding += sum(x.shape[1] - len(k) for k in rows if k is not None)
        seen += rows
    return seen, padding


@pytest.mark.parametrize("bucket", [True, False])
def test_training_epoch_reads_every_example_once_but_a_partial_batch(loader_data, bucket):
    out, expected = loader_data
    loader = InstructionLoader(out, "train", 3, bucket=bucket, seed=1)
    n = loader.num_examples()
    assert n == 40 and loader.num_batches() == 40 // 3
    orders = []
    for epoch in range(2):
        assert loader.state_dict() == {"epoch": epoch, "batch": 0}
        seen, _ = collect_epoch(loader, expected)
        assert None not in seen
        counts = Counter(seen)
        assert len(seen) == 39 and max(counts.values()) == 1  # 40 % 3 = 1 left out
        assert set(seen) <= set(expected)
        orders.append(seen)
    assert loader.state_dict() == {"epoch": 2, "batch": 0}
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_validation_reads_every_example_exactly_once(loader_data):
    out, expected = loader_data
    loader = InstructionLoader(out, "val", 3, shuffle=False)
    assert loader.num_examples() == 10 and loader.num_batches() == 4
    seen, _ = collect_epoch(loader, expected)
    assert seen.count(None) == 2  # the last batch is filled up with empty rows
    real = [k for k in seen if k is not None]
    assert len(real) == 10 == len(set(real))
    assert [len(k) for k in real] == sorted(len(k) for k in real)  # shortest first
    assert collect_epoch(loader, expected)[0] == seen  # the next pass reads the same batches
    loader.next_batch()
    loader.reset()
    assert collect_epoch(loader, expected)[0] == seen


def test_prompt_tokens_are_the_prompt(loader_data):
    out, expected = loader_data
    loader = InstructionLoader(out, "val", 2, shuffle=False)
    prompts = {tuple(p) for p, _ in expected.values()}
    assert all(tuple(loader.prompt_tokens(i)) in prompts for i in range(loader.num_examples()))


@pytest.mark.parametrize("bucket", [True, False])
def test_state_dict_resumes_the_exact_batch_sequence(loader_data, bucket):
    out, _ = loader_data
    a = InstructionLoader(out, "train", 3, bucket=bucket, seed=5)
    for _ in range(11):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain ints, as a checkpoint keeps them
    b = InstructionLoader(out, "train", 3, bucket=bucket, seed=5)
    b.load_state_dict(state)
    for _ in range(20):  # across the end of the epoch
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict() and a.state_dict()["epoch"] == 2


def test_a_position_past_this_plans_epoch_goes_on_from_the_next(loader_data):
    out, _ = loader_data
    small = InstructionLoader(out, "train", 1, seed=5)
    small.load_state_dict({"epoch": 0, "batch": small.num_batches() - 1})  # saved with 1-example batches
    big = InstructionLoader(out, "train", 3, seed=5)  # resumed with 3: that batch is past the epoch's 13
    big.load_state_dict(small.state_dict())
    assert big.state_dict() == {"epoch": 1, "batch": 0}
    big.next_batch()


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_together_read_what_one_rank_reads_at_the_same_global_batch(loader_data, shuffle):
    out, expected = loader_data
    split = "train" if shuffle else "val"
    one = InstructionLoader(out, split, 4, shuffle=shuffle, seed=2)
    ranks = [InstructionLoader(out, split, 2, rank=r, world_size=2, shuffle=shuffle, seed=2) for r in (0, 1)]
    assert all(r.num_batches() == one.num_batches() for r in ranks)
    for _ in range(one.num_batches() + 2):
        whole = row_examples(*one.next_batch(), expected)
        parts = [row_examples(*r.next_batch(), expected) for r in ranks]
        assert parts[0] + parts[1] == whole
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_bucketing_reduces_padding(loader_data):
    out, expected = loader_data
    padding = {bucket: collect_epoch(InstructionLoader(out, "train", 4, bucket=bucket, seed=0), expected)[1]
               for bucket in (True, False)}
    assert padding[True] < padding[False] / 2, padding


def test_loader_errors(loader_data, tmp_path):
    out, _ = loader_data
    with pytest.raises(DataError, match="--max_len 21"):
        InstructionLoader(out, "train", 2, block_size=20)
    with pytest.raises(DataError, match="lower --batch_size"):
        InstructionLoader(out, "val", 6, world_size=2)
    with pytest.raises(DataError, match="no prepared data"):
        InstructionLoader(tmp_path, "train", 2)


# ----------------------------------------------------------------------------- the masked loss


def test_padded_masked_batch_loss_equals_the_per_example_loss_by_hand(loader_data):
    out, expected = loader_data
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    loader = InstructionLoader(out, "train", 6, bucket=False, seed=0)
    x, y = loader.next_batch()
    rows = row_examples(x, y, expected)
    assert len({len(k) for k in rows}) > 1  # rows of different lengths: the batch holds padding

    total, n_targets = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        _, mean_loss = model(x, y)
        _, sum_loss = model(x, y, reduction="sum")
        for key in rows:
            prompt, response = expected[key]
            tokens = torch.tensor(prompt + response)
            logits, _ = model(tokens[None, :-1])  # the example alone, unpadded
            logp = F.log_softmax(logits[0].double(), dim=-1)
            nll = -logp.gather(1, tokens[1:, None])[:, 0]
            is_response = torch.arange(1, len(tokens)) >= len(prompt)  # targets that are response or EOT
            total += nll[is_response].sum()
            n_targets += int(is_response.sum())
    assert n_targets == int((y != IGNORE_INDEX).sum())
    assert abs(mean_loss.item() - (total / n_targets).item()) < 1e-5
    assert abs(sum_loss.item() - total.item()) < 1e-5 * n_targets


def test_dolly_from_the_hub_offline_says_to_pass_a_local_copy(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "data_prep/prepare_dolly.py", "--out_dir", str(tmp_path / "out")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "could not load databricks/databricks-dolly-15k" in proc.stderr and "--input FILE.jsonl" in proc.stderr
    assert not (tmp_path / "out").exists()
