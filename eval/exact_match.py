"""Exact-match accuracy of greedy answers to instruction records: did the model learn to answer?

    python eval/exact_match.py --checkpoint checkpoints/demo/pretrained checkpoints/demo/tuned \\
        --data data/demo/source/heldout.jsonl --show 3

Each record ({"instruction", "context" (optional), "response"}, as for
data_prep/prepare_custom_dataset.py) is rendered with the prompt template of model/prompt.py and
answered greedily; an answer counts when it equals the record's response, leading and trailing
whitespace aside. Records may carry "task" and "split" fields (data_prep/demo_corpus.py writes
them): the accuracy is also broken down by each. With several checkpoints, each is scored on the
same records and --show N prints N answers side by side, one per task where tasks are given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from data_prep.instruction_shards import check_record, jsonl_rows
from model.atomic import atomic_write
from model.compute import pick_device
from model.engine import SamplingParams, generate_batch
from model.gpt import GPT
from model.pretrained import load_pretrained
from model.prompt import render_prompt
from model.shards import DataError
from model.tokenizer import encode


def load_records(path: str | Path) -> list[dict]:
    """The records of a jsonl file, checked as instruction data is; DataError names a bad line."""
    records = []
    for where, obj in jsonl_rows(path):
        try:
            check_record(obj)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        records.append(obj)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def answer(model: GPT, records: list[dict], max_tokens: int = 32) -> list[str]:
    """The model's greedy answer to each record, with the same prompt template fine-tuning used."""
    prompts = [encode(render_prompt(r["instruction"], r.get("context"))) for r in records]
    return generate_batch(model, prompts, SamplingParams(max_tokens=max_tokens, temperature=0))


def is_match(answer: str, expected: str) -> bool:
    return answer.strip() == expected.strip()


def score(records: list[dict], answers: list[str]) -> dict:
    """{"n", "correct", "accuracy", "by_split": {split: {...}}, "by_task": {task: {...}}}."""

    def summary(pairs: list[tuple[dict, str]]) -> dict:
        correct = sum(is_match(a, r["response"]) for r, a in pairs)
        return {"n": len(pairs), "correct": correct, "accuracy": correct / len(pairs)}

    pairs = list(zip(records, answers))
    result = summary(pairs)
    for field in ("split", "task"):
        groups: dict[str, list] = defaultdict(list)
        for r, a in pairs:
            if field in r:
                groups[str(r[field])].append((r, a))
        result[f"by_{field}"] = {k: summary(v) for k, v in sorted(groups.items())}
    return result


def _percent(s: dict) -> str:
    return f"{s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}%"


def format_score(name: str, result: dict) -> str:
    """A few lines for a terminal: the total, then by split and by task."""
    lines = [f"{name}: exact match {_percent(result)}"]
    for field in ("by_split", "by_task"):
        if result[field]:
            lines.append(f"  {field[3:]:5s}  " + " | ".join(f"{k} {_percent(v)}" for k, v in result[field].items()))
    return "\n".join(lines)


def pick_examples(records: list[dict], n: int) -> list[int]:
    """Indices of n records to show, taking tasks in turn so the examples differ in kind."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[str(r.get("task", ""))].append(i)
    queues = list(by_task.values())
    picked: list[int] = []
    while len(picked) < min(n, len(records)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def format_side_by_side(records: list[dict], answers: dict[str, list[str]], indices: list[int]) -> str:
    """Each picked record's question and expected answer, then every model's answer with a mark."""
    width = max(len(name) for name in answers)
    lines = []
    for i in indices:
        r = records[i]
        question = r["instruction"] + (f" [{r['context']}]" if r.get("context") else "")
        lines.append(f"Q: {question}   (expected: {r['response']})")
        for name, texts in answers.items():
            mark = "right" if is_match(texts[i], r["response"]) else "wrong"
            lines.append(f"   {name:{width}s}  {mark}  {json.dumps(texts[i].strip()[:70])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a missing checkpoint or bad data)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="step_*.pt files or run directories (their newest checkpoint), scored one after another")
    parser.add_argument("--data", required=True, help="jsonl of {instruction, context, response[, task, split]}")
    parser.add_argument("--max_tokens", type=int, default=32, help="most tokens per answer (default: %(default)s)")
    parser.add_argument("--show", type=int, default=0, help="print N questions with every model's answer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    parser.add_argument("--out_json", default=None, help="write every model's scores and answers here")
    args = parser.parse_args(argv)
    if args.max_tokens < 1 or args.show < 0:
        parser.error("--max_tokens must be >= 1 and --show >= 0")
    device = pick_device(args.device)
    try:
        records = load_records(args.data)
        answers: dict[str, list[str]] = {}
        results = {}
        for checkpoint in args.checkpoint:
            model, source = load_pretrained(checkpoint)
            name = Path(checkpoint).name if Path(checkpoint).is_dir() else checkpoint
            model.to(device).requires_grad_(False).pack_for_cpu_inference()  # faster on CPU; nothing elsewhere
            answers[name] = answer(model, records, args.max_tokens)
            results[name] = score(records, answers[name]) | {"checkpoint": source}
            print(format_score(name, results[name]))
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.show:
        print(format_side_by_side(records, answers, pick_examples(records, args.show)))
    if args.out_json:
        report = {"data": args.data, "models": {name: results[name] | {"answers": answers[name]} for name in answers}}
        atomic_write(args.out_json, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
