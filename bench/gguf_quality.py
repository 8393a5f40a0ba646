"""What each GGUF type costs: a checkpoint exported by model/export_gguf.py and run by llama.cpp itself,
against our own model, on held-out questions with known answers.

    python bench/gguf_quality.py --checkpoint checkpoints/demo/dpo \\
        --data data/demo/source/heldout.jsonl data/demo/source/heldout_chat.jsonl

For each type (--types): the file's size; the mean loss of every question's expected answer and its
<|endoftext|> after the prompt our server renders, llama.cpp's against ours; how many of llama.cpp's
greedy answers equal ours; and its exact match beside ours. The first row is our own engine with
int8 weights (--quant int8, model/int8_linear.py), measured the same way. llama.cpp is the prebuilt
library that `make .venv/llama.cpp` unpacks, driven by tests/llama_cpp.py (LLAMA_CPP_LIB_DIR elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the ctypes binding of llama.cpp that the GGUF tests use

import pytest
import torch
import torch.nn.functional as F

from eval.exact_match import is_match, load_questions
from llama_cpp import LlamaModel, need_llama_cpp
from model.cli import HelpFormatter
from model.compute import describe_cpu
from model.engine import SamplingParams, generate_batch
from model.export_gguf import TYPES, write_gguf
from model.pretrained import load_pretrained
from model.prompt import prompt_tokens
from model.tokenizer import EOT, VOCAB_SIZE, decode, encode


def answer_loss(logits: torch.Tensor, tokens: list[int], start: int) -> float:
    """Summed loss of tokens[start:] given logits (row i: after tokens[:i + 1])."""
    return F.cross_entropy(logits[start - 1 : -1, :VOCAB_SIZE].double(), torch.tensor(tokens[start:]),
                           reduction="sum").item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_*.pt file or a run directory")
    parser.add_argument("--data", nargs="+", required=True, help="held-out questions with answers (eval/exact_match.py's formats)")
    parser.add_argument("--types", default="f32,f16,q8_0,q4_0", help="comma-separated GGUF types")
    parser.add_argument("--max_tokens", type=int, default=16, help="most tokens per greedy answer")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    args = parser.parse_args()
    need_llama_cpp_or_exit()
    print(describe_cpu(), flush=True)
    model, source = load_pretrained(args.checkpoint)
    model.eval().requires_grad_(False)
    questions = load_questions(args.data)
    prompts = [prompt_tokens(list(q.turns)) for q in questions]
    sequences = [p + encode(q.expected) + [EOT] for p, q in zip(prompts, questions)]
    answer_tokens = sum(len(s) - len(p) for p, s in zip(prompts, sequences))
    ours = generate_batch(model, prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    ours_right = sum(is_match(a, q.expected) for a, q in zip(ours, questions))

    def loss_of(m) -> float:
        return sum(answer_loss(m(torch.tensor([s]))[0][0], s, len(p)) for p, s in zip(prompts, sequences)) / answer_tokens

    def row(name: str, size: str, loss: float, answers: list[str]) -> None:
        same = sum(a == b for a, b in zip(answers, ours))
        right = sum(is_match(a, q.expected) for a, q in zip(answers, questions))
        print(f"| {name} | {size} | {loss:.5f} | {(loss - ours_loss) / ours_loss:+.3%} | {same} / {len(questions)} "
              f"| {right} / {len(questions)} |", flush=True)

    ours_loss = loss_of(model)
    print(f"{source}: {len(questions)} questions; ours: answer loss {ours_loss:.5f}, exact match {ours_right}")
    print("| type | size | answer loss | vs ours | answers equal to ours | exact match |")
    print("|---|---|---|---|---|---|")
    int8 = copy.deepcopy(model)
    int8.prepare_inference("int8")
    int8_bytes = sum(m.int8.nbytes() for m in int8.modules() if getattr(m, "int8", None) is not None)
    int8_answers = generate_batch(int8, prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    row("ours int8", f"{int8_bytes / 2**20:.1f} MiB of int8 matrices", loss_of(int8), int8_answers)
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in args.types.split(","):
            if file_type not in TYPES:
                parser.error(f"unknown type {file_type!r}: one of {', '.join(TYPES)}")
            path = Path(tmp) / f"{file_type}.gguf"
            write_gguf(model, path, file_type)
            theirs = LlamaModel(path, threads=args.threads)
            try:
                loss = sum(answer_loss(torch.tensor(theirs.logits(s)), s, len(p))
                           for p, s in zip(prompts, sequences)) / answer_tokens
                answers = [decode([t for t in theirs.greedy(p, args.max_tokens, stop=EOT) if t != EOT]) for p in prompts]
            finally:
                theirs.close()
            row(f"{file_type} in llama.cpp", f"{path.stat().st_size / 2**20:.1f} MiB file", loss, answers)


def need_llama_cpp_or_exit() -> None:
    """need_llama_cpp() skips a test where llama.cpp is missing; here it says what to do and exits."""
    try:
        need_llama_cpp()
    except (RuntimeError, pytest.skip.Exception) as e:
        sys.exit(f"bench/gguf_quality.py: {e}")


if __name__ == "__main__":
    main()
