"""The demo's built-in corpus: a small world of facts and skills, written by this code (no third-party text).

    python data_prep/demo_corpus.py                  # -> data/demo/source/{pretrain,instructions,heldout}.jsonl

The world: sums of numbers from 1 to 5, the larger or smaller of two digits, the days of the week
and the months (what comes after or before, days in a month, a month's number), how many items a
short list holds, and three digits in increasing order. It is written two ways:

- pretrain.jsonl: prose documents ({"text": ...}) stating every fact many times, in varied
  sentences ("The sum of 2 and 5 is 7.", "Of 3 and 9, the larger is 9.") and as questions
  followed by their answers, as a FAQ would ("Which day follows Friday? Saturday.", also with a
  follow-up: "Which is larger, 3 or 8? 8. And 2 or 6? 6."), for data_prep/fineweb.py --input. A model pretrained on it has read the facts and the questions
  but never the instruction template it will be asked in.
- instructions.jsonl: {"instruction", "context", "response", "task"} records for
  data_prep/prepare_custom_dataset.py; counting and sorting put their list in the context.
- heldout.jsonl: the same kind of records, each with "split" saying what fine-tuning never saw:
  "new operands" (a fact no instruction record asks about, asked in a familiar phrasing) or
  "new phrasing" (a wording no instruction record uses; the prose uses its words). The facts are
  all in the pretraining prose: held-out accuracy measures whether tuning taught the model to
  answer, not whether it memorised the tuning set.
- conversations.jsonl: two- and three-turn chats in OpenAI's {"messages": [...]} form whose later
  questions need an earlier turn: "Which is larger, 3 or 8?" "8" "And 2 or 6?" "6" (FOLLOW_UPS), and
  "Sort 9, 2, 5." "2, 5, 9" "Now the other way round." "9, 5, 2".
- heldout_chat.jsonl: such chats whose last question follows up on a fact that no tuning chat
  follows up on (a sixth of the known facts, kept for it, and the new ones) or on a list tuning never
  saw, split "follow-up"; their last reply is the expected answer.

Everything follows from --seed: the same command writes the same bytes. eval/exact_match.py
scores a checkpoint on heldout.jsonl and heldout_chat.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from model.atomic import atomic_write  # noqa: E402
from model.cli import HelpFormatter  # noqa: E402

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
          ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31)]
ITEMS = ["apple", "pear", "plum", "cup", "spoon", "lamp", "book", "pen"]
FILES = ("pretrain.jsonl", "instructions.jsonl", "heldout.jsonl", "conversations.jsonl", "heldout_chat.jsonl")
LISTS_PER_TASK = 150  # lists a counting or sorting task asks about in fine-tuning

# A conversation's follow-up question, elliptic as people ask them: "And 2 or 6?" asks for the larger
# after "Which is larger, 3 or 8?" and for the smaller after "Which is smaller...", "And March?" for its
# days. No follow-up shares a frame with another task's: "And 2 and 6?" for sums turned held-out sums
# ("What is the sum of 2 and 4?") into comparisons, and "And March?" for month numbers too took month
# numbers down to 1/24 in one run.
FOLLOW_UPS = {
    "add": "And {a} plus {b}?",
    "larger": "And {a} or {b}?", "smaller": "And {a} or {b}?",
    "day_after": "And after {day}?", "day_before": "And before {day}?",
    "month_after": "And after {month}?", "month_before": "And before {month}?",
    "month_days": "And {month}?", "month_number": "And the number of {month}?",
}
REVERSE = "Now the other way round."  # after a sorted list: the same numbers from largest to smallest
CHATS_PER_TASK = 60  # tuning conversations per follow-up task (and one per sorted list)
# but sums get more and comparisons fewer: comparisons already fill a quarter of the single-turn records
# (72 facts each, 8 phrasings) and sums few (25 facts); with 60 each, held-out sums asked "What is the
# sum of 2 and 4?" were answered as comparisons ("2"), 0/20 in one run
CHATS_FOR = {"add": 120, "larger": 30, "smaller": 30}
# The prose asks follow-ups too, as a FAQ would ("Which is larger, 3 or 8? 8. And 2 or 6? 6."), in this
# share of a task's sentences: the pretrained model has read the elliptic question on every fact, as it
# has read every single question, and tuning teaches it to answer one in the template. Without it the
# tuned model learned follow-ups fact by fact: one on a fact no tuning chat followed up on got the
# earlier answer again ("And 5 or 3?" -> "9"), 28/100 held out.
DIALOG_SHARE = 0.25
HELDOUT_CHATS_PER_TASK = 10
# Sums are asked three times over in tuning: 21 known sums in 8 phrasings make 168 records against 488
# for each comparison, whose frames ("Which of 2 and 4 is larger?") the held-out "What is the sum of 2
# and 4?" resembles; asked once, it was answered with an operand ("2"), 0/20, in two runs.
RECORD_REPEATS = {"add": 3}


@dataclass(frozen=True)
class Fact:
    """One thing the world knows: the words templates fill in, and the answer an instruction expects."""

    task: str
    slots: tuple[tuple[str, str], ...]  # (name, text) pairs for str.format
    answer: str

    def fill(self, template: str) -> str:
        return template.format(**dict(self.slots), answer=self.answer)


Template = tuple[str, str]  # (instruction, context) with {slots}


@dataclass(frozen=True)
class Task:
    """A family of facts, the sentences that state them and the instructions that ask them.

    statements: prose sentences. asked: instruction templates used in fine-tuning; new_asked: kept
    for the held-out set. Finite tasks list every fact in `facts`; list tasks (counting, sorting)
    have none there and `draw` one at random instead, as often as needed.

    Each task is tuned in eight phrasings: with four, the tuned model took each wording as a key of
    its own and failed wordings it had not seen (sorting asked "Put these numbers in increasing
    order." was 0/20 in every run). No two tasks share a sentence frame, or one task's held-out
    wording reads as the other's ("What is the larger of 2 and 4?" made "What is the sum of 2 and
    4?" a comparison).
    """

    name: str
    statements: tuple[str, ...]
    asked: tuple[Template, ...]
    new_asked: tuple[Template, ...]
    facts: tuple[Fact, ...] = ()
    draw: Callable[[random.Random], Fact] | None = None

    def sentence(self, fact: Fact, rng: random.Random) -> str:
        """The fact in prose: a statement, or a question of any phrasing followed by its answer, as a
        FAQ would put it. The prose never uses the instruction template, so a pretrained model knows
        the facts and the questions but not the format it will be asked in."""
        forms = self.statements + tuple(f"{q} {c}. {{answer}}." if c else f"{q} {{answer}}."
                                        for q, c in self.asked + self.new_asked)
        text = fact.fill(rng.choice(forms))
        return text[:1].upper() + text[1:]  # a statement may open with a list item

    def dialog(self, first: Fact, then: Fact, rng: random.Random) -> str:
        """A question on `first` and its answer, then the task's follow-up on `then` and its answer, as
        a FAQ would write a conversation: "Which is larger, 3 or 8? 8. And 2 or 6? 6." """
        question, context = rng.choice(self.asked + self.new_asked)
        opening = first.fill(f"{question} {context}. {{answer}}." if context else f"{question} {{answer}}.")
        asked, answered = _follow_up(then)
        return f"{opening} {asked['content']} {answered['content']}."


def _fact(task: str, answer: object, **slots: object) -> Fact:
    return Fact(task, tuple((k, str(v)) for k, v in slots.items()), str(answer))


def _said(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1]


def _count(rng: random.Random) -> Fact:
    items = rng.sample(ITEMS, rng.randint(2, 5))
    return _fact("count", len(items), items=", ".join(items), said=_said(items))


def _sort(rng: random.Random) -> Fact:
    nums = rng.sample(range(1, 10), 3)
    return _fact("sort", ", ".join(map(str, sorted(nums))), nums=", ".join(map(str, nums)), said=_said(list(map(str, nums))))


def _neighbour(unit: str, names: list[str], after: bool) -> Task:
    """What comes after (or before) each day or month: one task, worded alike for both units."""
    word, verb, shift = ("after", "follows", 1) if after else ("before", "precedes", -1)
    return Task(
        f"{unit}_{word}",
        (f"The {unit} {word} {{{unit}}} is {{answer}}.", f"{word.capitalize()} {{{unit}}} comes {{answer}}."),
        ((f"What {unit} comes {word} {{{unit}}}?", ""), (f"Which {unit} {verb} {{{unit}}}?", ""),
         (f"What is the {unit} {word} {{{unit}}}?", ""), (f"Which {unit} is {word} {{{unit}}}?", ""),
         (f"Tell me the {unit} {word} {{{unit}}}.", ""), (f"What {unit} is {word} {{{unit}}}?", ""),
         (f"Which {unit} comes {word} {{{unit}}}?", ""), (f"Say which {unit} {verb} {{{unit}}}.", "")),
        ((f"Name the {unit} {word} {{{unit}}}.", ""),),
        tuple(_fact(f"{unit}_{word}", names[(i + shift) % len(names)], **{unit: n}) for i, n in enumerate(names)))


PAIRS = [(a, b) for a in range(1, 10) for b in range(1, 10) if a != b]


def _comparison(word: str, synonym: str, pick: Callable[[int, int], int]) -> Task:
    """The larger (or smaller) of two different digits: one task, worded alike for both; the held-out
    phrasing uses the synonym the tuning phrasings use only once."""
    return Task(
        word,
        (f"Of {{a}} and {{b}}, the {word} is {{answer}}.", f"{{answer}} is {word} than the other of {{a}} and {{b}}."),
        ((f"Which is {word}, {{a}} or {{b}}?", ""), (f"Name the {word} number: {{a}} or {{b}}.", ""),
         (f"Which number is {synonym}, {{a}} or {{b}}?", ""), (f"Of {{a}} and {{b}}, which is {word}?", ""),
         (f"Say which is {word}: {{a}} or {{b}}.", ""), (f"Which of {{a}} and {{b}} is {word}?", ""),
         (f"Pick the {word} number: {{a}} or {{b}}.", ""), (f"Between {{a}} and {{b}}, which is {word}?", "")),
        ((f"Of {{a}} and {{b}}, which is {synonym}?", ""),),
        tuple(_fact(word, pick(a, b), a=a, b=b) for a, b in PAIRS))


TASKS = (
    Task("add",
         ("{a} plus {b} is {answer}.", "The sum of {a} and {b} is {answer}.", "Adding {a} and {b} gives {answer}."),
         (("What is {a} plus {b}?", ""), ("Add {a} and {b}.", ""), ("What do {a} and {b} add up to?", ""),
          ("How much is {a} plus {b}?", ""), ("Compute {a} plus {b}.", ""), ("What does {a} plus {b} make?", ""),
          ("Find the sum of {a} and {b}.", ""), ("What do you get when you add {a} and {b}?", "")),
         (("What is the sum of {a} and {b}?", ""),),
         tuple(_fact("add", a + b, a=a, b=b) for a in range(1, 6) for b in range(1, 6))),
    _comparison("larger", "bigger", max),
    _comparison("smaller", "less", min),
    _neighbour("day", DAYS, after=True),
    _neighbour("day", DAYS, after=False),
    _neighbour("month", [m for m, _ in MONTHS], after=True),
    _neighbour("month", [m for m, _ in MONTHS], after=False),
    Task("month_days",
         ("{month} has {answer} days.", "There are {answer} days in {month}."),
         (("How many days are in {month}?", ""), ("How many days does {month} have?", ""),
          ("How many days has {month}?", ""), ("Count the days of {month}.", ""),
          ("How many days are there in {month}?", ""), ("Tell me how many days {month} has.", ""),
          ("What is the number of days in {month}?", ""), ("How many days make up {month}?", "")),
         (("How long is {month} in days?", ""),),
         tuple(_fact("month_days", n, month=m) for m, n in MONTHS)),
    Task("month_number",
         ("{month} is month number {answer}.", "In the calendar, {month} is month {answer}."),
         (("What number is the month of {month}?", ""), ("Which month number is {month}?", ""),
          ("What is the number of {month}?", ""), ("Which number does {month} have?", ""),
          ("Which number in the calendar is {month}?", ""), ("Tell me the number of {month}.", ""),
          ("Which position does {month} have in the year?", ""), ("In the calendar, what number is {month}?", "")),
         (("Give the month number of {month}.", ""),),
         tuple(_fact("month_number", i + 1, month=m) for i, (m, _) in enumerate(MONTHS))),
    Task("count",
         ("Count {said} and you get {answer}.", "{said}: that makes {answer} things."),
         (("How many items are in this list?", "{items}"), ("Count the items.", "{items}"),
          ("How many things are in the list?", "{items}"), ("How many items are in this list: {items}?", ""),
          ("How many items does this list have?", "{items}"), ("Tell me how many things are listed: {items}.", ""),
          ("What is the number of items here?", "{items}"), ("Count these things: {items}.", "")),
         (("How many things does the list hold?", "{items}"), ("How many things does this list hold: {items}?", "")),
         draw=_count),
    Task("sort",
         ("Sorted from smallest to largest, {said} are {answer}.", "In increasing order, {said} become {answer}."),
         (("Sort these numbers from smallest to largest.", "{nums}"), ("Sort {nums}.", ""),
          ("Order these numbers from smallest to largest: {nums}.", ""), ("Put the numbers in order.", "{nums}"),
          ("Arrange these numbers from lowest to highest.", "{nums}"), ("Sort this list of numbers.", "{nums}"),
          ("Put these numbers in order: {nums}.", ""), ("Order the numbers, smallest first.", "{nums}")),
         (("Put these numbers in increasing order.", "{nums}"), ("Put these numbers in increasing order: {nums}", "")),
         draw=_sort),
)


def _record(fact: Fact, template: Template, **extra: str) -> dict:
    instruction, context = template
    return {"instruction": fact.fill(instruction), "context": fact.fill(context), "response": fact.answer,
            "task": fact.task, **extra}


def _distinct(task: Task, rng: random.Random, n: int, taken: set[Fact]) -> list[Fact]:
    """n different random facts of a list task that are not in taken."""
    found: list[Fact] = []
    while len(found) < n:
        fact = task.draw(rng)
        if fact not in taken and fact not in found:
            found.append(fact)
    return found


def _turn(fact: Fact, template: Template) -> list[dict]:
    """One exchange as chat messages: the record's context (a list) is the system message, as the server renders it."""
    record = _record(fact, template)
    system = [{"role": "system", "content": record["context"]}] if record["context"] else []
    return system + [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": fact.answer}]


def _follow_up(fact: Fact) -> list[dict]:
    if fact.task == "sort":
        answer = ", ".join(reversed(fact.answer.split(", ")))
        return [{"role": "user", "content": REVERSE}, {"role": "assistant", "content": answer}]
    return [{"role": "user", "content": fact.fill(FOLLOW_UPS[fact.task])}, {"role": "assistant", "content": fact.answer}]


def _chat(task: Task, first: Fact, then: list[Fact], rng: random.Random, **extra: str) -> dict:
    messages = _turn(first, rng.choice(task.asked))
    for fact in then:
        messages += _follow_up(fact)
    return {"messages": messages, "task": task.name, **extra}


def conversations(task: Task, known: list[Fact], new: list[Fact], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(tuning, held-out) chats of a task. Tuning chats open with a known fact and follow up on known
    facts, a third of them twice; a sixth of the known facts are never followed up on in tuning, and
    each held-out chat follows up on one of those or on a new fact (sort: on a new list)."""
    if task.name == "sort":  # every known list, then reversed; held out: new lists
        tuned = [_chat(task, fact, [fact], rng) for fact in known]
        return tuned, [_chat(task, fact, [fact], rng, split="follow-up") for fact in new[:HELDOUT_CHATS_PER_TASK]]
    if task.name not in FOLLOW_UPS:
        return [], []
    reserved = rng.sample(known, max(1, len(known) // 6))
    follow = [f for f in known if f not in reserved]
    tuned = [_chat(task, rng.choice(known), rng.sample(follow, 1 + (rng.random() < 1 / 3)), rng)
             for _ in range(CHATS_FOR.get(task.name, CHATS_PER_TASK))]
    unseen = reserved + new
    heldout = [_chat(task, rng.choice(known), [unseen[i % len(unseen)]], rng, split="follow-up")
               for i in range(HELDOUT_CHATS_PER_TASK)]
    return tuned, heldout


def build(seed: int, sentences_per_task: int, heldout_fraction: float, heldout_per_task: int) -> dict[str, list[dict]]:
    """The five files' records.

    Fine-tuning asks every fact of a finite task in each `asked` phrasing, except a seeded
    heldout_fraction of them, and LISTS_PER_TASK random lists of each list task. The held-out set
    asks up to heldout_per_task of the facts it never asked (new lists, for list tasks) in familiar
    phrasings, and as many facts in the task's held-out phrasings. The prose has sentences_per_task
    sentences of each task (the facts of a finite task in turn, fresh random lists for a list task),
    DIALOG_SHARE of them a question and a follow-up, shuffled into documents. Every task gets the same
    share because a tiny model learns a fact from how often it reads it: a few hundred times is what it
    needs within the demo's minutes.

    Each task and each part (facts, prose, records, chats) draws from a random stream of its own, so
    a change to one part leaves the others as they were (the prose's sentences in their order, though
    where it is cut into documents follows the chats' shuffle).
    """
    def stream(part: str, task: Task) -> random.Random:
        return random.Random(f"{seed}/{part}/{task.name}")

    sentences: list[str] = []
    instructions: list[dict] = []
    heldout: list[dict] = []
    chats: list[dict] = []
    heldout_chats: list[dict] = []
    for task in TASKS:
        rng = stream("facts", task)
        if task.facts:
            facts = list(task.facts)
            rng.shuffle(facts)
            n_new = max(1, round(heldout_fraction * len(facts)))
            new, known = facts[:n_new], facts[n_new:]
        else:
            known = _distinct(task, rng, LISTS_PER_TASK, set())
            new = _distinct(task, rng, heldout_per_task, set(known))
        sentences += prose(task, sentences_per_task, stream("prose", task))
        rng = stream("records", task)
        instructions += [_record(f, t) for f in known for t in task.asked] * RECORD_REPEATS.get(task.name, 1)
        heldout += [_record(f, rng.choice(task.asked), split="new operands") for f in new[:heldout_per_task]]
        phrased = rng.sample(known + new, min(heldout_per_task, len(known) + len(new)))
        heldout += [_record(f, rng.choice(task.new_asked), split="new phrasing") for f in phrased]
        tuned_chats, new_chats = conversations(task, known, new, stream("chats", task))
        chats += tuned_chats
        heldout_chats += new_chats
    rng = random.Random(f"{seed}/order")
    rng.shuffle(sentences)
    rng.shuffle(instructions)
    rng.shuffle(chats)
    # documents of 4 to 12 sentences: fineweb.py puts <|endoftext|> between them, as between web pages
    docs, i = [], 0
    while i < len(sentences):
        n = rng.randint(4, 12)
        docs.append({"text": " ".join(sentences[i : i + n])})
        i += n
    return {"pretrain.jsonl": docs, "instructions.jsonl": instructions, "heldout.jsonl": heldout,
            "conversations.jsonl": chats, "heldout_chat.jsonl": heldout_chats}


def prose(task: Task, n: int, rng: random.Random) -> list[str]:
    """n sentences of a task: its facts in turn (a finite task: every fact equally often, since a task of
    7 facts would otherwise state each far more often than one of 72) or fresh random lists; where the
    task has a follow-up, DIALOG_SHARE of them a question and a follow-up on another fact (sort: the
    same list the other way round)."""
    def fact(i: int) -> Fact:
        return task.facts[i % len(task.facts)] if task.facts else task.draw(rng)

    order = list(range(n))
    rng.shuffle(order)  # which sentences are dialogs
    dialogs = set(order[: round(DIALOG_SHARE * n)]) if task.name in FOLLOW_UPS or task.name == "sort" else set()
    sentences = []
    for i in range(n):
        first = fact(i)
        if i in dialogs:
            sentences.append(task.dialog(first, first if task.name == "sort" else rng.choice([f for f in task.facts if f != first]), rng))
        else:
            sentences.append(task.sentence(first, rng))
    return sentences


def write_corpus(out_dir: str | Path, seed: int = 1337, sentences_per_task: int = 6000, heldout_fraction: float = 0.15,
                 heldout_per_task: int = 20) -> dict:
    """Write the corpus and a manifest.json of its settings and counts into out_dir; return the manifest.

    An out_dir whose manifest records the same settings is left as it is (the files are the same)."""
    out_dir = Path(out_dir)
    settings = {"seed": seed, "sentences_per_task": sentences_per_task, "heldout_fraction": heldout_fraction,
                "heldout_per_task": heldout_per_task}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and all((out_dir / f).is_file() for f in FILES):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            return manifest
    corpus = build(seed, sentences_per_task, heldout_fraction, heldout_per_task)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in corpus.items():
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(out_dir / name, lambda f: f.write(data))
    manifest = {"producer": "data_prep/demo_corpus.py", "settings": settings,
                "counts": {name: len(rows) for name, rows in corpus.items()},
                "tasks": [t.name for t in TASKS]}
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    atomic_write(manifest_path, lambda f: f.write(data))  # last: it vouches for the files
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", default="data/demo/source", help="where the five jsonl files and manifest.json go")
    parser.add_argument("--seed", type=int, default=1337, help="seed of every random choice")
    parser.add_argument("--sentences_per_task", type=int, default=6000, help="prose sentences of each task")
    parser.add_argument("--heldout_fraction", type=float, default=0.15,
                        help="share of each task's facts that fine-tuning never asks about")
    parser.add_argument("--heldout_per_task", type=int, default=20,
                        help="held-out records per task and kind (new operands, new phrasing)")
    args = parser.parse_args(argv)
    if args.sentences_per_task < 1 or args.heldout_per_task < 1:
        parser.error("--sentences_per_task and --heldout_per_task must be >= 1")
    if not 0 < args.heldout_fraction < 1:
        parser.error("--heldout_fraction must be in (0, 1)")
    manifest = write_corpus(args.out_dir, args.seed, args.sentences_per_task, args.heldout_fraction, args.heldout_per_task)
    counts = manifest["counts"]
    print(f"{args.out_dir}: {counts['pretrain.jsonl']} prose documents, {counts['instructions.jsonl']} instruction "
          f"records, {counts['conversations.jsonl']} conversations, {counts['heldout.jsonl']} held-out records and "
          f"{counts['heldout_chat.jsonl']} held-out conversations over {len(manifest['tasks'])} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
