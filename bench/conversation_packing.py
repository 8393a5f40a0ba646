"""How conversations are laid out for tuning: one sequence per conversation (every trained reply masked in
it, what data_prep/instruction_shards.py writes) against one example per trained reply (its history,
then the reply alone), on the same conversations.

Claim under test: the two train the same thing (every reply's loss after exactly the prompt the server
renders for its history: equal up to float rounding, printed), and one sequence computes fewer token
positions, by about the number of trained replies per conversation for short replies.

    python bench/conversation_packing.py                                     # the demo's built-in conversations
    python bench/conversation_packing.py --input chats.jsonl --max_len 1024  # yours (OpenAI messages or ShareGPT)

Printed: conversations, trained replies, token positions of each layout (their ratio), the mean loss
over trained tokens of a random tiny GPT under each (their difference), and the time of one forward
and backward pass over all examples of each, in batches of --batch_size padded rows (their ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_prep.demo_corpus import build
from data_prep.instruction_shards import collect_conversations, encode_conversation, jsonl_rows, read_rows
from model.compute import describe_cpu
from model.data import padded_batch
from model.gpt import GPT, IGNORE_INDEX, GPTConfig
from model.prompt import Turn, fit_turns, render_turns


def per_reply(turns: list[Turn], max_len: int) -> list[tuple[list[int], list[int]]]:
    """One example per trained reply: its history as the server renders it (fitted to max_len), the reply alone trained."""
    examples = []
    for j, turn in enumerate(turns):
        if turn.reply is None or not turn.weight:
            continue
        kept, _ = fit_turns(turns[: j + 1], max_len)
        tokens, mask = render_turns([replace(t, weight=int(k == len(kept) - 1)) for k, t in enumerate(kept)])
        if len(tokens) <= max_len:  # a reply too long even alone: data prep cuts its context or drops it
            examples.append((tokens, mask))
    return examples


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int):
    """(x, y) padded batches of the examples, longest first; y is IGNORE_INDEX off the trained tokens."""
    examples = sorted(examples, key=lambda e: -len(e[0]))
    for i in range(0, len(examples), batch_size):
        yield padded_batch(examples[i : i + batch_size])  # as the tuning loader pads them


def mean_loss(model: GPT, examples, batch_size: int) -> float:
    """Mean cross-entropy over every trained token of the examples."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches(examples, batch_size):
            logits, _ = model(x)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
    return total / count


def step_time(model: GPT, examples, batch_size: int) -> float:
    """Seconds of forward + backward over all the examples."""
    started = time.perf_counter()
    for x, y in batches(examples, batch_size):
        _, loss = model(x, y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=None,
                        help="jsonl files of conversations (default: data_prep/demo_corpus.py's, seed 1337)")
    parser.add_argument("--max_len", type=int, default=128, help="most tokens per example (the demo's context + 1: 128)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per forward pass when timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per layout (the median is printed)")
    args = parser.parse_args(argv)
    print(describe_cpu())
    if args.input:
        conversations, _ = collect_conversations([jsonl_rows(p) for p in args.input], skip_invalid=False)
    else:
        chats = build(1337, 10, 0.15, 20)["conversations.jsonl"]
        conversations = [turns for _, _, turns in read_rows((f"chat {i}", c) for i, c in enumerate(chats))]
    # only conversations whose every reply fits as it is: those data prep shortens have no one-per-reply twin
    def shortened(turns: list[Turn]) -> bool:
        counts = encode_conversation(turns, args.max_len)[1]
        return bool(counts["truncated"] or counts["dropped"])

    conversations = [t for t in conversations if not shortened(t)]
    packed = [e for turns in conversations for e in encode_conversation(turns, args.max_len)[0]]
    alone = [e for turns in conversations for e in per_reply(turns, args.max_len)]
    replies = len(alone)  # one example per trained reply
    positions = [sum(len(t) - 1 for t, _ in layout) for layout in (packed, alone)]
    print(f"{len(conversations)} conversations, {replies} trained replies: {len(packed)} packed examples, "
          f"{len(alone)} one-per-reply examples")
    print(f"token positions computed: packed {positions[0]:,}, one per reply {positions[1]:,} "
          f"(one per reply computes {positions[1] / positions[0]:.2f}x as many)")

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.max_len, n_layer=6, n_head=4, n_embd=128))
    losses = [mean_loss(model.eval(), layout, args.batch_size) for layout in (packed, alone)]
    print(f"mean loss over trained tokens, random weights: packed {losses[0]:.6f}, one per reply {losses[1]:.6f} "
          f"(difference {abs(losses[0] - losses[1]):.2e})")
    model.train()
    times: list[list[float]] = [[], []]
    for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits both alike
        for k, layout in enumerate((packed, alone)):
            times[k].append(step_time(model, layout, args.batch_size))
    median = [statistics.median(t) for t in times]
    print(f"forward + backward over all examples (median of {args.repeats}): packed {median[0]:.2f} s, "
          f"one per reply {median[1]:.2f} s ({median[1] / median[0]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
