"""data_prep/demo_corpus.py: the built-in world is true, reproducible, and its held-out questions are
really held out (never asked in fine-tuning) while their facts are in the pretraining prose."""

import json
import re

import pytest

from data_prep.demo_corpus import DAYS, FILES, FOLLOW_UPS, ITEMS, MONTHS, REVERSE, build, main, write_corpus

MONTH_NAMES = [m for m, _ in MONTHS]
WORDS = set(DAYS) | set(MONTH_NAMES) | set(ITEMS)


@pytest.fixture(scope="module")
def corpus():
    return build(seed=5, sentences_per_task=300, heldout_fraction=0.15, heldout_per_task=20)


def operands(record: dict) -> tuple[str, ...]:
    """The numbers, days, months and items a record asks about, in order."""
    return tuple(w for w in re.findall(r"\w+", record["instruction"] + " " + record["context"])
                 if w.isdigit() or w in WORDS)


def phrasing(record: dict) -> str:
    """The record's wording with its operands blanked out."""
    return re.sub(r"\w+", lambda m: "_" if m.group(0).isdigit() or m.group(0) in WORDS else m.group(0),
                  record["instruction"])


def expected(record: dict) -> str:
    """The right answer, worked out here independently of the generator."""
    ops = operands(record)
    nums = [int(x) for x in ops if x.isdigit()]
    task = record["task"]
    if task == "add":
        return str(nums[0] + nums[1])
    if task in ("larger", "smaller"):
        return str(max(nums) if task == "larger" else min(nums))
    if task == "count":
        return str(sum(w in ITEMS for w in ops))
    if task == "sort":
        return ", ".join(map(str, sorted(nums)))
    if task.startswith("day_"):
        i = DAYS.index(ops[0])
        return DAYS[(i + (1 if task == "day_after" else -1)) % 7]
    i = MONTH_NAMES.index(ops[0])
    return {"month_after": MONTH_NAMES[(i + 1) % 12], "month_before": MONTH_NAMES[i - 1],
            "month_days": str(MONTHS[i][1]), "month_number": str(i + 1)}[task]


def test_every_answer_is_true(corpus):
    records = corpus["instructions.jsonl"] + corpus["heldout.jsonl"]
    assert len({r["task"] for r in records}) == 11
    for r in records:
        assert r["response"] == expected(r), r


def chat_records(chat: dict) -> list[dict]:
    """Each exchange of a chat as the record a lone question would be: a follow-up takes the task of the chat."""
    records, context = [], ""
    for m in chat["messages"]:
        if m["role"] == "system":
            context = m["content"]
        elif m["role"] == "user":
            records.append({"instruction": m["content"], "context": context, "task": chat["task"]})
            context = ""
        else:
            records[-1]["response"] = m["content"]
    return records


def test_every_conversation_answer_is_true_and_needs_the_turn_before(corpus):
    chats = corpus["conversations.jsonl"] + corpus["heldout_chat.jsonl"]
    assert {c["task"] for c in chats} == set(FOLLOW_UPS) | {"sort"}
    for chat in chats:
        first, *follow_ups = chat_records(chat)
        assert first["response"] == expected(first) and 1 <= len(follow_ups) <= 2
        for r in follow_ups:
            if chat["task"] == "sort":  # the list of the turn before, the other way round
                assert r["instruction"] == REVERSE and r["response"] == ", ".join(reversed(first["response"].split(", ")))
            else:  # elliptic: "And 2 or 6?"
                assert r["response"] == expected(r) and r["instruction"].startswith("And ")
                assert not {"larger", "smaller", "days"} & set(r["instruction"].split())


def test_held_out_follow_ups_were_never_followed_up_on_in_tuning(corpus):
    def follow_up(chat: dict, record: dict) -> tuple:
        """What a follow-up asks about: its operands (sort: the list of the turn before)."""
        asked = chat_records(chat)[0] if chat["task"] == "sort" else record
        return chat["task"], operands(asked)

    tuned = {follow_up(c, r) for c in corpus["conversations.jsonl"] for r in chat_records(c)[1:]}
    heldout = corpus["heldout_chat.jsonl"]
    assert len(heldout) >= 80 and {c["split"] for c in heldout} == {"follow-up"}
    for chat in heldout:
        assert follow_up(chat, chat_records(chat)[-1]) not in tuned, chat


def test_held_out_questions_were_never_asked_in_fine_tuning(corpus):
    tuned = corpus["instructions.jsonl"]
    asked = {(r["task"], operands(r)) for r in tuned}
    tuned_phrasings = {phrasing(r) for r in tuned}
    heldout = corpus["heldout.jsonl"]
    by_split = {s: [r for r in heldout if r["split"] == s] for s in ("new operands", "new phrasing")}
    assert len(by_split["new operands"]) >= 60 and len(by_split["new phrasing"]) >= 150
    for r in by_split["new operands"]:
        assert (r["task"], operands(r)) not in asked, r
        assert phrasing(r) in tuned_phrasings, r  # only the operands are new
    for r in by_split["new phrasing"]:
        assert phrasing(r) not in tuned_phrasings, r
    # and no held-out record is a fine-tuning record verbatim
    assert not {(r["instruction"], r["context"]) for r in heldout} & {(r["instruction"], r["context"]) for r in tuned}


def test_the_prose_states_every_held_out_fact(corpus):
    sentences = [s for doc in corpus["pretrain.jsonl"] for s in re.split(r"(?<=\.) ", doc["text"])]
    words = [set(re.findall(r"\w+", s)) for s in sentences]
    for r in corpus["heldout.jsonl"]:
        if r["task"] in ("count", "sort"):
            continue  # skills on lists the prose draws afresh: any list is new to it
        needed = set(operands(r)) | set(re.findall(r"\w+", r["response"]))
        assert any(needed <= w for w in words), r
    # the prose never uses the instruction format: the pretrained model has not seen it
    assert not any("###" in doc["text"] for doc in corpus["pretrain.jsonl"])


def test_the_prose_asks_every_held_out_follow_up_with_its_answer():
    corpus = build(seed=1337, sentences_per_task=6000, heldout_fraction=0.15, heldout_per_task=20)  # the demo's
    prose = " ".join(doc["text"] for doc in corpus["pretrain.jsonl"])
    for chat in corpus["heldout_chat.jsonl"]:
        if chat["task"] == "sort":
            continue  # a held-out list is new to the prose; it reverses other lists
        asked, answered = chat["messages"][-2:]
        assert f"{asked['content']} {answered['content']}." in prose, chat
    assert prose.count(REVERSE) > 0


def test_each_part_draws_its_own_randomness(monkeypatch):
    """More tuning chats change the chats (tuning and held-out), and nothing else: not the prose's
    sentences, the records or the held-out questions (only where the prose is cut into documents)."""
    import data_prep.demo_corpus as demo_corpus

    before = build(seed=5, sentences_per_task=100, heldout_fraction=0.15, heldout_per_task=20)
    monkeypatch.setattr(demo_corpus, "CHATS_PER_TASK", demo_corpus.CHATS_PER_TASK + 5)
    after = build(seed=5, sentences_per_task=100, heldout_fraction=0.15, heldout_per_task=20)
    assert len(after["conversations.jsonl"]) > len(before["conversations.jsonl"])
    for name in ("instructions.jsonl", "heldout.jsonl"):
        assert after[name] == before[name], name
    prose = [" ".join(doc["text"] for doc in corpus["pretrain.jsonl"]) for corpus in (before, after)]
    assert prose[0] == prose[1]


def test_same_seed_same_bytes_and_a_rerun_rewrites_nothing(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_corpus(a, seed=1, sentences_per_task=100)
    write_corpus(b, seed=1, sentences_per_task=100)
    write_corpus(c, seed=2, sentences_per_task=100)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "instructions.jsonl").read_bytes() != (c / "instructions.jsonl").read_bytes()
    mtimes = {name: (a / name).stat().st_mtime_ns for name in FILES}
    write_corpus(a, seed=1, sentences_per_task=100)
    assert {name: (a / name).stat().st_mtime_ns for name in FILES} == mtimes
    manifest = write_corpus(a, seed=1, sentences_per_task=150)  # other settings: written anew
    assert manifest["settings"]["sentences_per_task"] == 150
    assert json.loads((a / "manifest.json").read_text()) == manifest


def test_cli_writes_records_the_instruction_prep_accepts(tmp_path, capsys):
    from data_prep.instruction_shards import jsonl_rows, read_rows

    assert main(["--out_dir", str(tmp_path), "--sentences_per_task", "100"]) == 0
    assert "held-out conversations over 11 tasks" in capsys.readouterr().out
    for name in ("instructions.jsonl", "heldout.jsonl", "conversations.jsonl", "heldout_chat.jsonl"):
        for where, _, turns in read_rows(jsonl_rows(tmp_path / name)):
            assert not isinstance(turns, ValueError), f"{where}: {turns}"
    with pytest.raises(SystemExit):
        main(["--out_dir", str(tmp_path), "--heldout_fraction", "1"])
