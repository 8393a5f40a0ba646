"""HellaSwag scoring speed: eval/hellaswag.py's batched, packed scorer vs one example per forward.

Claim under test: at the GPT-2 124M shape on CPU, the batched scorer is at least 3x faster in
examples/s than the usual one-example-at-a-time approach, with the same losses.

    python bench/hellaswag_speed.py                             # 124M shape, CPU, 100 examples, 3 rounds
    python bench/hellaswag_speed.py --examples 10042 --rounds 1 --device cuda --skip_single   # full-val wall time

one-at-a-time  what most HellaSwag scripts do (e.g. build-nanogpt's): per example, the four rows
               ctx + ending padded to the longest, one forward with logits at every position,
               cross-entropy over the ending positions.
batched        eval.hellaswag.score: the context once and its four endings in one row (positions
               restart per ending, an attention mask keeps endings apart), --batch_size such rows
               sorted by length per forward, lm_head only where a loss is wanted.

Data: --data (HellaSwag jsonl), else ../shared/data/hellaswag_val_head10.jsonl beside the repo.
The context of example i is paired with the endings of example j, for --examples distinct pairs
(cycled past all of them), so lengths vary as in the full set (see varied_examples). Weights are random (speed does not depend on them).
Both run in one process on the same model and examples, alternating round by round, so machine
load hits both alike; each round times a full pass. The figure is the ratio of median examples/s.
The max difference between the two approaches' summed losses is printed as a check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from eval.hellaswag import Example, load_examples, score
from model.compute import describe_cpu
from model.gpt import GPT, GPTConfig
from model.tokenizer import VOCAB_SIZE, encode

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag_val_head10.jsonl"


@torch.inference_mode()
def score_one_at_a_time(model: GPT, examples: list[Example], device: torch.device, dtype: str) -> list[list[float]]:
    """Summed ending losses, one example (four padded rows, full logits) per forward."""
    out = []
    for ex in examples:
        ctx = encode(ex.ctx)
        rows = [ctx + encode(" " + e) for e in ex.endings]
        T = max(map(len, rows))
        tokens = torch.zeros(4, T, dtype=torch.long)
        mask = torch.zeros(4, T, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, len(ctx) : len(r)] = True
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits, _ = model(tokens)
        shifted = logits[:, :-1, :VOCAB_SIZE].float().contiguous()
        losses = F.cross_entropy(shifted.view(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1), reduction="none")
        out.append((losses.view(4, T - 1) * mask[:, 1:]).sum(dim=1).tolist())
    return out


def varied_examples(source: list[Example], n: int) -> list[Example]:
    """n examples with as many distinct lengths as the source allows: context i with the endings of j.

    Repeating a 10-example file would give 10 lengths only, and length-sorted batches of it far more
    padding than batches of the real 10042 examples, whose lengths are dense.
    """
    pairs = [(i, j) for i in range(len(source)) for j in range(len(source))]
    picked = [pairs[k] for k in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()]
    return [Example(ind=k, ctx=source[i].ctx, endings=source[j].endings, label=source[j].label)
            for k, (i, j) in enumerate(picked[k % len(picked)] for k in range(n))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a HellaSwag jsonl (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=100, help="examples per pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each approach, alternating")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward of the batched scorer")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--skip_single", action="store_true", help="time the batched scorer only (full-val wall time)")
    args = parser.parse_args()
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} is absent: pass --data PATH to a HellaSwag jsonl (e.g. the cached data/hellaswag/hellaswag_val.jsonl)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    examples = varied_examples(load_examples(args.data), args.examples)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).to(device).eval()
    print(f"{model.num_params() / 1e6:.0f}M parameters | {args.examples} examples | device {device} | {args.dtype} | "
          f"{torch.get_num_threads()} threads")

    approaches = {"batched": lambda exs: [r["losses_sum"] for r in score(model, exs, device, batch_size=args.batch_size, dtype=args.dtype)]}
    if not args.skip_single:
        approaches["one-at-a-time"] = lambda exs: score_one_at_a_time(model, exs, device, args.dtype)
    for run in approaches.values():  # warm-up: allocator, kernels, tokenizer caches
        run(examples[: args.batch_size])
    times = {name: [] for name in approaches}
    losses = {}
    for _ in range(args.rounds):
        for name, run in approaches.items():
            sync(device)
            t0 = time.perf_counter()
            losses[name] = run(examples)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    print(f"{'approach':<14} {'examples/s (median)':>20} {'seconds per pass':>30}")
    for name, ts in times.items():
        print(f"{name:<14} {args.examples / statistics.median(ts):>20.1f} {'  '.join(f'{t:.2f}' for t in ts):>30}")
    if not args.skip_single:
        ratio = statistics.median(times["one-at-a-time"]) / statistics.median(times["batched"])
        diff = max(abs(a - b) for x, y in zip(losses["batched"], losses["one-at-a-time"]) for a, b in zip(x, y))
        print(f"batched / one-at-a-time: {ratio:.2f}x examples/s | max |summed loss difference| {diff:.2e}")


if __name__ == "__main__":
    main()
