"""Exact-match accuracy of greedy answers to held-out questions: did the model learn to answer?

    python eval/exact_match.py --checkpoint checkpoints/demo/pretrained checkpoints/demo/tuned \\
        --data data/demo/source/heldout.jsonl --show 3

The data is a jsonl in any format data_prep/prepare_custom_dataset.py reads: instruction records
({"instruction", "context", "response"}), OpenAI messages or ShareGPT conversations. The last reply
of each record is the expected answer; everything before it is rendered as the server renders it
(model/prompt.py) and answered greedily. An answer counts when it equals the expected one, leading
and trailing whitespace aside. The accuracy is broken down by single- and multi-turn questions,
and by the records' "task" and "split" fields where they have them (data_prep/demo_corpus.py writes
them). With several checkpoints, each is scored on the same records and --show N prints N answers
side by side, one per task where tasks are given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from data_prep.instruction_shards import jsonl_rows, read_rows
from model.atomic import atomic_write
from model.cli import add_quant_argument
from model.compute import Compute, pick_device
from model.data import InstructionLoader
from model.engine import SamplingParams, generate_batch
from model.gpt import GPT
from model.pretrained import load_pretrained
from model.prompt import Turn, prompt_tokens
from model.shards import DataError
from model.tokenizer import decode


@dataclass(frozen=True)
class Question:
    """A held-out question: the conversation up to the turn to answer (whose reply is None), the
    expected reply, and labels to break the accuracy down by ("turns", and "task", "split" if given)."""

    turns: tuple[Turn, ...]
    expected: str
    labels: dict[str, str]


def load_questions(paths: list[str | Path]) -> list[Question]:
    """The questions of jsonl files (each in a format of its own), checked as tuning data is; DataError
    names a bad line."""
    questions = []
    for where, value, turns in (row for path in paths for row in read_rows(jsonl_rows(path))):
        if isinstance(turns, ValueError):
            raise DataError(f"{where}: {turns}")
        if turns[-1].reply is None:
            raise DataError(f"{where}: the last message must be the expected answer (an assistant message)")
        labels = {"turns": "multi-turn" if len(turns) > 1 else "single-turn"}
        labels |= {k: str(value[k]) for k in ("task", "split") if k in value}
        questions.append(Question((*turns[:-1], replace(turns[-1], reply=None)), turns[-1].reply, labels))
    if not questions:
        raise DataError(f"{', '.join(map(str, paths))}: no records")
    return questions


def answer(model: GPT, questions: list[Question], max_tokens: int = 32) -> list[str]:
    """The model's greedy answer to each question, rendered as the server renders a chat."""
    prompts = [prompt_tokens(list(q.turns)) for q in questions]
    return generate_batch(model, prompts, SamplingParams(max_tokens=max_tokens, temperature=0))


def is_match(answer: str, expected: str) -> bool:
    return answer.strip() == expected.strip()


LABELS = ("turns", "split", "task")


def score(questions: list[Question], answers: list[str]) -> dict:
    """{"n", "correct", "accuracy", "by_turns": {"single-turn": {...}, ...}, "by_split": {...}, "by_task": {...}}."""

    def summary(pairs: list[tuple[Question, str]]) -> dict:
        correct = sum(is_match(a, q.expected) for q, a in pairs)
        return {"n": len(pairs), "correct": correct, "accuracy": correct / len(pairs)}

    pairs = list(zip(questions, answers))
    result = summary(pairs)
    for field in LABELS:
        groups: dict[str, list] = defaultdict(list)
        for q, a in pairs:
            if field in q.labels:
                groups[q.labels[field]].append((q, a))
        result[f"by_{field}"] = {k: summary(v) for k, v in sorted(groups.items())}
    return result


def _percent(s: dict) -> str:
    return f"{s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}%"


def format_score(name: str, result: dict) -> str:
    """A few lines for a terminal: the total, then by split and by task."""
    lines = [f"{name}: exact match {_percent(result)}"]
    for field in LABELS:
        if result[f"by_{field}"]:
            lines.append(f"  {field:5s}  " + " | ".join(f"{k} {_percent(v)}" for k, v in result[f"by_{field}"].items()))
    return "\n".join(lines)


def pick_examples(questions: list[Question], n: int) -> list[int]:
    """Indices of n questions to show, taking tasks in turn, single- and multi-turn alternately, so the
    examples differ in kind."""
    by_kind: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_kind[q.labels["turns"], q.labels.get("task", "")].append(i)
    single = [queue for (turns, _), queue in by_kind.items() if turns == "single-turn"]
    multi = [queue for (turns, _), queue in by_kind.items() if turns == "multi-turn"]
    queues = [q for pair in itertools.zip_longest(single, multi) for q in pair if q is not None]
    picked: list[int] = []
    while len(picked) < min(n, len(questions)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def format_side_by_side(questions: list[Question], answers: dict[str, list[str]], indices: list[int]) -> str:
    """Each picked question (after its earlier turns) and expected answer, then every model's answer with a mark."""
    width = max(len(name) for name in answers)
    lines = []
    for i in indices:
        q = questions[i]
        asked = [t.instruction + (f" [{t.context_text()}]" if t.context else "") for t in q.turns]
        history = "".join(f"{a} -> {t.reply} | " for a, t in zip(asked, q.turns[:-1]))
        lines.append(f"Q: {history}{asked[-1]}   (expected: {q.expected})")
        for name, texts in answers.items():
            mark = "right" if is_match(texts[i], q.expected) else "wrong"
            lines.append(f"   {name:{width}s}  {mark}  {json.dumps(texts[i].strip()[:70])}")
    return "\n".join(lines)


def sample_answers(loader: InstructionLoader, num_samples: int, max_tokens: int, compute: Compute):
    """An evaluation (model/trainer.py) that answers the prompts of the first val examples (or pairs)
    greedily, on rank 0, for the log."""
    prompts = [loader.prompt_tokens(i) for i in range(min(num_samples, loader.num_examples()))]

    def evaluate(model: GPT) -> dict:
        if not compute.master:
            return {}
        answers = generate_batch(model, prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
        samples = [{"prompt": decode(p), "answer": a} for p, a in zip(prompts, answers)]
        for s in samples:
            compute.print0(f"{s['prompt']}{s['answer']}\n" + "-" * 40)
        return {"samples": samples}

    return evaluate


def exact_match_evaluation(paths: list[str], compute: Compute):
    """An evaluation (model/trainer.py) that logs the exact-match accuracy of greedy answers to the records in paths
    (on rank 0): overall, single- and multi-turn, and per "split" field where the records have one."""
    questions = load_questions(paths)

    def evaluate(model: GPT) -> dict:
        if not compute.master:
            return {}
        result = score(questions, answer(model, questions))
        splits = {f"exact_match_{k.replace(' ', '_').replace('-', '_')}": v["accuracy"]
                  for field in ("by_split", "by_turns") for k, v in result[field].items()}
        return {"exact_match": result["accuracy"], **splits}

    return evaluate


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a missing checkpoint or bad data)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="step_*.pt files or run directories (their newest checkpoint), scored one after another")
    parser.add_argument("--data", nargs="+", required=True,
                        help="jsonl files of instruction records, OpenAI messages or ShareGPT conversations "
                             "(optional task, split)")
    parser.add_argument("--max_tokens", type=int, default=32, help="most tokens per answer (default: %(default)s)")
    parser.add_argument("--show", type=int, default=0, help="print N questions with every model's answer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    parser.add_argument("--out_json", default=None, help="write every model's scores and answers here")
    add_quant_argument(parser)
    args = parser.parse_args(argv)
    if args.max_tokens < 1 or args.show < 0:
        parser.error("--max_tokens must be >= 1 and --show >= 0")
    device = pick_device(args.device)
    try:
        questions = load_questions(args.data)
        answers: dict[str, list[str]] = {}
        results = {}
        for checkpoint in args.checkpoint:
            model, source = load_pretrained(checkpoint)
            name = Path(checkpoint).name if Path(checkpoint).is_dir() else checkpoint
            weights = model.to(device).requires_grad_(False).prepare_inference(args.quant)
            print(f"{name}: {weights}")
            answers[name] = answer(model, questions, args.max_tokens)
            results[name] = score(questions, answers[name]) | {"checkpoint": source}
            print(format_score(name, results[name]))
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.show:
        print(format_side_by_side(questions, answers, pick_examples(questions, args.show)))
    if args.out_json:
        report = {"data": args.data, "models": {name: results[name] | {"answers": answers[name]} for name in answers}}
        atomic_write(args.out_json, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
