"""Chat with a model in the terminal: streaming, multi-turn, the server's sampling parameters.

    python web/chat_cli.py --checkpoint checkpoints/dolly              # a run directory (its newest step)
    python web/chat_cli.py --checkpoint checkpoints/dolly/step_001200.pt --temperature 0
    python web/chat_cli.py --init_from gpt2 --system "Answer briefly."

Type a message and press Enter. /reset starts a new conversation, /quit (or Ctrl-D) leaves.
Ctrl-C stops the answer being written (what was written stays in the conversation).

The conversation is rendered by model/prompt.py's render_messages, exactly as the server renders a
chat request, and answered by model/engine.py's generate, as the server's engine would.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from model.compute import pick_device  # noqa: E402
from model.engine import SamplingParams, generate  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.pretrained import load_pretrained  # noqa: E402
from model.prompt import render_messages  # noqa: E402
from model.tokenizer import encode  # noqa: E402


def bounded(kind, low: float, high: float | None = None):
    """An argparse type: kind(value), checked to lie in [low, high], as the API checks it."""

    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model (one of)")
    g.add_argument("--checkpoint", default=None, help="a step_*.pt of any stage, or a run directory (its newest)")
    g.add_argument("--init_from", default=None, help="a Hugging Face GPT-2 (gpt2, ...) or a local HF directory")
    parser.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    g = parser.add_argument_group("sampling (as in the API)")
    g.add_argument("--temperature", type=bounded(float, 0, 2), default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top_p", type=bounded(float, 0, 1), default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top_k", type=bounded(int, 0), default=0, help="sample among the k likeliest; 0 = all")
    g.add_argument("--max_tokens", type=bounded(int, 1), default=256, help="longest answer (default: %(default)s)")
    g.add_argument("--presence_penalty", type=bounded(float, -2, 2), default=0.0)
    g.add_argument("--frequency_penalty", type=bounded(float, -2, 2), default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampled answers reproducible")
    g.add_argument("--stop", action="append", default=[], help="end the answer before this text (up to 4, repeatable)")
    parser.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.init_from is None):
        parser.error("pass one of --checkpoint and --init_from")
    if len(args.stop) > 4:
        parser.error("at most 4 --stop strings")
    return args


def fit_history(messages: list[dict], context: int) -> tuple[list[int] | None, int]:
    """The prompt tokens of the conversation, dropping its oldest turns until it leaves room for
    at least one answer token; returns (tokens, turns dropped), or (None, n) if even the last user
    message alone does not fit. The system message and the last user message are always kept."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    for dropped in range(len(turns)):
        prompt = encode(render_messages(system + turns[dropped:]))
        if len(prompt) < context:
            return prompt, dropped
    return None, len(turns)


def answer(model: GPT, prompt: list[int], params: SamplingParams) -> str:
    """Stream one answer to stdout; Ctrl-C ends it early. Returns the text written."""
    print("model> ", end="", flush=True)
    text = ""
    try:
        for delta in generate(model, prompt, params):
            text += delta
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    return text


def chat(model: GPT, args: argparse.Namespace) -> None:
    """The read-answer loop on stdin, until /quit or end of input."""
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    context = model.config.block_size
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            messages = list(start)
            print("(new conversation)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt, dropped = fit_history(messages, context)
        if prompt is None:
            print(f"error: that message alone is longer than the model's context ({context} tokens)", file=sys.stderr)
            messages.pop()
            continue
        if dropped:
            print(f"(the {dropped} oldest message(s) no longer fit the {context}-token context: left out)", file=sys.stderr)
            messages = messages[: len(start)] + messages[len(start) + dropped :]
        room = min(params.max_tokens, context - len(prompt))
        text = answer(model, prompt, replace(params, max_tokens=room))
        messages.append({"role": "assistant", "content": text})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, source = load_pretrained(args.checkpoint, args.init_from)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(pick_device(args.device)).eval().requires_grad_(False)
    print(f"{source} ({model.config.block_size}-token context). /reset: new conversation, /quit: leave.", file=sys.stderr)
    chat(model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
