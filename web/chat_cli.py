"""Chat with a model in the terminal: streaming, multi-turn, the server's sampling parameters.

    python web/chat_cli.py --checkpoint checkpoints/dolly              # a run directory (its newest step)
    python web/chat_cli.py --checkpoint checkpoints/dolly/step_001200.pt --temperature 0
    python web/chat_cli.py --init_from gpt2 --system "Answer briefly."
    python web/chat_cli.py --checkpoint checkpoints/dolly --quant int8   # int8 weights: faster on CPU

Type a message and press Enter. /reset starts a new conversation, /quit (or Ctrl-D) leaves.
Ctrl-C stops the answer being written (what was written stays in the conversation); at the
prompt it leaves.

The conversation is rendered by model/prompt.py, exactly as the server renders a chat request (and
as tuning rendered conversations), and answered by model/engine.py's generate, as the server's
engine would. When it outgrows the model's context, its oldest exchanges (a question and its
answer) are left out as the server does with NANOGPT_DROP_OLD_TURNS=1 (model/prompt.py's fit_turns,
with room for the answer), and stderr says which; the system prompt and the newest message stay.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch  # noqa: E402

from model.cli import add_quant_argument  # noqa: E402
from model.compute import pick_device  # noqa: E402
from model.engine import DEFAULT_TEMPERATURE, SamplingParams, generate  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.pretrained import load_pretrained  # noqa: E402
from model.prompt import chat_turns, fit_turns, history_budget, prompt_tokens  # noqa: E402
from web.chat_request import MAX_STOP_STRINGS  # noqa: E402

PREVIEW_CHARS = 40  # how much of a left-out question the notice quotes


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
    parser.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    add_quant_argument(parser)
    g = parser.add_argument_group("sampling (as in the API)")
    g.add_argument("--temperature", type=bounded(float, 0, 2), default=DEFAULT_TEMPERATURE,
                   help="0 = greedy (default: %(default)s, as the server's and the chat page's)")
    g.add_argument("--top_p", type=bounded(float, 0, 1), default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top_k", type=bounded(int, 0), default=0, help="sample among the k likeliest; 0 = all (default)")
    g.add_argument("--max_tokens", type=bounded(int, 1), default=256,
                   help="longest answer, cut to the room left in the context (default: %(default)s)")
    g.add_argument("--presence_penalty", type=bounded(float, -2, 2), default=0.0, help="in [-2, 2] (default: %(default)s)")
    g.add_argument("--frequency_penalty", type=bounded(float, -2, 2), default=0.0, help="in [-2, 2] (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="makes sampled answers reproducible (default: none)")
    g.add_argument("--stop", action="append", default=[],
                   help=f"end the answer before this text (repeatable, up to {MAX_STOP_STRINGS})")
    parser.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.init_from is None):
        parser.error("pass one of --checkpoint and --init_from")
    if len(args.stop) > MAX_STOP_STRINGS:
        parser.error(f"at most {MAX_STOP_STRINGS} --stop strings")
    return args


def fit_history(messages: list[dict], context: int, max_tokens: int) -> tuple[list[int], int]:
    """The prompt tokens of the conversation after dropping its oldest exchanges (a user message and
    its answer) as the server does, and how many exchanges were dropped. The system message and the
    last user message are always kept: the prompt returned may still be too long, which the caller
    checks."""
    kept, dropped = fit_turns(chat_turns(messages), history_budget(context, max_tokens))
    return prompt_tokens(kept), dropped


def exchange_starts(messages: list[dict]) -> list[int]:
    """Index of the user message that opens each exchange: the first, then each after an answer (a user
    message after a blank answer continues the exchange, as model/prompt.py's chat_turns has it)."""
    starts, answered = [], True
    for i, m in enumerate(messages):
        if m["role"] == "user":
            if answered:
                starts.append(i)
            answered = False
        elif m["role"] == "assistant" and m["content"].strip():
            answered = True
    return starts


def preview(text: str) -> str:
    """A message quoted on one line, cut to PREVIEW_CHARS."""
    text = " ".join(text.split())
    return f'"{text}"' if len(text) <= PREVIEW_CHARS else f'"{text[: PREVIEW_CHARS - 1]}…"'


def answer(model: GPT, prompt: list[int], params: SamplingParams) -> str:
    """Stream one answer to stdout; Ctrl-C ends it early. Returns the text shown."""
    text = ""
    try:
        print("model> ", end="", flush=True)
        # closing(): an answer cut by Ctrl-C frees its engine (KV cache) now, not whenever GC gets to it
        with torch.inference_mode(), contextlib.closing(generate(model, prompt, params)) as deltas:
            for delta in deltas:
                print(delta, end="", flush=True)
                text += delta
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    return text


def chat(model: GPT, params: SamplingParams, system: str | None = None) -> None:
    """The read-answer loop on stdin, until /quit, end of input or Ctrl-C at the prompt."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    context = model.config.block_size
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            messages = list(start)
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        prompt, dropped = fit_history(messages, context, params.max_tokens)
        if len(prompt) >= context:
            what = "your message with the system prompt" if start else "your message"
            print(f"error: {what} is {len(prompt)} tokens, the model's context {context}: send a shorter one",
                  file=sys.stderr)
            messages.pop()
            continue
        if dropped:
            users = exchange_starts(messages)
            questions = [preview(messages[i]["content"]) for i in users[:dropped]]
            print(f"(the conversation outgrew the {context}-token context: left out the oldest "
                  f"{dropped} exchange(s), asking {', '.join(questions)})", file=sys.stderr)
            messages = start + messages[users[dropped] :]
        room = context - len(prompt)  # the engine cannot write past the context
        text = answer(model, prompt, replace(params, max_tokens=min(params.max_tokens, room)))
        messages.append({"role": "assistant", "content": text})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, source = load_pretrained(args.checkpoint, args.init_from)
    except (OSError, ValueError) as e:  # a missing file, a bad checkpoint, the Hub out of reach: all say what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    # int8 weights are for the CPU: "auto" takes it even where a GPU is
    device = "cpu" if args.quant == "int8" and args.device == "auto" else pick_device(args.device)
    try:
        model.to(device).eval().requires_grad_(False)
    except (RuntimeError, AssertionError) as e:  # torch asserts when it was built without CUDA
        print(f"error: cannot use --device {device} ({e}): pass --device cpu", file=sys.stderr)
        return 2
    try:
        weights = model.prepare_inference(args.quant)
    except ValueError as e:  # int8 off the CPU
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?", not a crash
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # absent on Windows: input() then just lacks editing
            import readline  # noqa: F401  (importing it gives input() line editing and ↑ history)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(s for s in args.stop if s),  # as the API: an empty string would stop before the first token
    )
    print(f"{source} on {device}, {weights} ({model.config.block_size}-token context). "
          "/reset: new conversation, /quit: leave.", file=sys.stderr)
    chat(model, params, args.system)
    return 0


if __name__ == "__main__":
    sys.exit(main())
