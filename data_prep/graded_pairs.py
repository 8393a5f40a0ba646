"""Preference pairs from a model's own answers, where an answer can be checked: for model/dpo.py.

    python data_prep/graded_pairs.py --checkpoint checkpoints/demo/tuned \\
        --data data/demo/source/instructions.jsonl data/demo/source/conversations.jsonl \\
        --out data/demo/graded_pairs.jsonl
    python data_prep/prepare_preferences.py --input data/demo/graded_pairs.jsonl --out_dir data/demo/preferences

The data is tuning data whose last reply is the right answer (any format eval/exact_match.py reads).
For each question the model answers greedily (what a user at temperature 0 and exact match get)
and --samples times at --temperature; each answer is graded by exact match. Every distinct wrong
answer, up to --pairs_per_question of them (the greedy one first), becomes a pair with the right
answer as chosen and the wrong one as rejected, the conversation before it as messages. A question
the model always gets right gives no pair: there is nothing to move there. Lines are in
prepare_preferences.py's --input form, with the record's "task" where it has one.

Use training questions, never held-out ones: the pairs are training data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch  # noqa: E402

from eval.exact_match import is_match, load_questions  # noqa: E402
from model.atomic import atomic_write  # noqa: E402
from model.cli import HelpFormatter  # noqa: E402
from model.compute import pick_device  # noqa: E402
from model.engine import SamplingParams, generate_batch  # noqa: E402
from model.pretrained import load_pretrained  # noqa: E402
from model.prompt import prompt_tokens, turn_messages  # noqa: E402


def wrong_answers(expected: str, answers: list[str], limit: int) -> list[str]:
    """The distinct wrong answers among `answers`, in order, at most `limit`; blank ones are left out
    (a pair needs a rejected reply to train on)."""
    wrong: list[str] = []
    for a in answers:
        if a.strip() and not is_match(a, expected) and a.strip() not in (w.strip() for w in wrong):
            wrong.append(a)
    return wrong[:limit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the model to grade: a step_*.pt file or a run directory")
    parser.add_argument("--data", nargs="+", required=True, help="jsonl files of training questions with their answers")
    parser.add_argument("--out", required=True, help="the pairs, as jsonl")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per question, besides the greedy one")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled answers")
    parser.add_argument("--pairs_per_question", type=int, default=2, help="most pairs one question gives")
    parser.add_argument("--limit", type=int, default=0, help="grade a seeded random N of the questions (0: all)")
    parser.add_argument("--max_tokens", type=int, default=32, help="most tokens per answer")
    parser.add_argument("--seed", type=int, default=1337, help="seed of --limit's choice and of the sampling")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    args = parser.parse_args(argv)
    for name in ("samples", "limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if args.pairs_per_question < 1 or args.max_tokens < 1:
        parser.error("--pairs_per_question and --max_tokens must be >= 1")
    if args.temperature <= 0 and args.samples:
        parser.error("--temperature must be > 0 for sampled answers")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a missing checkpoint or bad data)."""
    args = parse_args(argv)
    try:
        questions = load_questions(args.data)
        model, source = load_pretrained(args.checkpoint)
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit and args.limit < len(questions):
        questions = random.Random(args.seed).sample(questions, args.limit)
    model.to(pick_device(args.device)).requires_grad_(False).pack_for_cpu_inference()
    prompts = [prompt_tokens(list(q.turns)) for q in questions]
    greedy = generate_batch(model, prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    torch.manual_seed(args.seed)  # the sampled answers follow from --seed
    sampled = [generate_batch(model, prompts, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))
               for _ in range(args.samples)]
    lines, right = [], 0
    for i, q in enumerate(questions):
        right += is_match(greedy[i], q.expected)
        answers = [greedy[i], *(s[i] for s in sampled)]
        for wrong in wrong_answers(q.expected, answers, args.pairs_per_question):
            task = {"task": q.labels["task"]} if "task" in q.labels else {}
            lines.append(json.dumps({"messages": turn_messages(list(q.turns)), "chosen": q.expected,
                                     "rejected": wrong, **task}))
    if not lines:
        print(f"error: {source} answered all {len(questions)} questions right in every sample: no pairs to write; "
              "raise --samples or --temperature", file=sys.stderr)
        return 2
    atomic_write(args.out, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print(f"{source}: greedy answers right {right}/{len(questions)} = {100 * right / len(questions):.1f}%; "
          f"{len(lines)} pairs (right answer, wrong answer) from {len(questions)} questions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
