"""Instruction-tuning throughput: padding waste and response tokens/s of random vs length-bucketed batches.

Claim under test: on Dolly-shaped (long-tailed) example lengths, micro-batches of whole examples in
plain random order, each padded to its longest row, spend more than 30% of the computed tokens on
padding; InstructionLoader's default length bucketing (model/data.py: sort each window of
BUCKET_WINDOW batches by length, then shuffle the batches) brings it down, and response tokens per
second of a training step rise by about the factor (1 - waste bucket) / (1 - waste random), the drop
in computed tokens per response token (a little more: shorter rows also make attention cheaper).

    python bench/finetune_throughput.py                          # B=8, 6/384/6 GPT, 6 timed micro-batches per variant
    python bench/finetune_throughput.py --steps 0                # padding waste only, no model (seconds)
    python bench/finetune_throughput.py --steps 16 --warmup 2 --threads 2
    python bench/finetune_throughput.py --n_layer 12 --n_embd 768 --n_head 12 --device cuda --dtype bfloat16 --steps 20

Data (no network): --records synthetic records shaped like databricks-dolly-15k, seeded. Their text is
random words that are one GPT-2 token each, so token counts follow the drawn lengths: instruction
lognormal around 15 tokens; a context on 30% of records, lognormal around 100 tokens with a tail past
1000; response lognormal around 60 tokens with a tail to about 1000. They go through the repo's own
pipeline (data_prep/instruction_shards.py: split_records with 10% held out, write_instruction_shards
with max_len 1024, which cuts long contexts and drops what still does not fit) into a temporary
directory, and InstructionLoader reads the train split of those shards, as model/finetune_dolly.py does.

Variants, same batch size, same seed, hence the same examples in each epoch:
  random  InstructionLoader(bucket=False): a seeded permutation cut into batches, each padded to its longest row
  bucket  InstructionLoader(bucket=True), the default (and finetune_dolly.py's unless --no_bucket)

Padding waste, over one full epoch of each loader (no model, cheap): padding positions / computed
positions, computed = B x padded width summed over batches, padding = the positions past each row's
example (the example ends with its closing <|endoftext|>, always a target, so a row's example ends at
its last target). Prompt positions are computed and not padding, though they are not trained on.

What is timed, per micro-batch, with time.perf_counter around the whole step: zero_grad, forward of a
fresh GPT (block 1024) with reduction="sum" divided by the micro-batch's target count (the loss of
model/trainer.py with one micro-step), backward, gradient clipping at 1.0, AdamW from
GPT.configure_optimizer; on CUDA a torch.cuda.synchronize() ends the step. Each variant has its own
model, both with the same initial weights. Which batches: --steps of each variant's epoch, picked at
evenly spaced quantiles of padded width ((k + 0.5) / steps), kept in epoch order, so a few steps
stand for the whole epoch's mix of short and long batches (the first batches of an epoch would be a
lottery: one 1000-token batch costs as much as twenty short ones). After --warmup untimed steps each
(on the first of those batches, in turn), steps alternate random batch i, bucket batch i, ... in one process,
so drift in clock speed or machine load hits both alike.
  response tokens/s  targets (y != -100: response tokens and each closing <|endoftext|>) of the
                     timed batches / their summed time
  computed tokens/s  B x width of the timed batches / their summed time: what the model does, padding included
The table also gives, per variant, the epoch's padding waste, mean padded width and response tokens
per micro-batch (the same for both: same examples, same number of batches), and the padding waste of
the timed sample, to show how well it stands for the epoch; the last row is bucket / random.
On a shared VM absolute times drift by tens of percent between runs; the bucket/random ratio is the
figure to read. The default --dropout is 0, not finetune_dolly.py's 0.1: on CPU, attention dropout
moves scaled_dot_product_attention onto its T x T math kernel, which makes a step on long rows far
slower (about 4x at B=8 x 1023 tokens on the 2-core VM this was written on), and the run too long there.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable
os.environ.setdefault("TQDM_DISABLE", "1")  # write_instruction_shards' progress bars would bury the table

import numpy as np
import torch

from data_prep.instruction_shards import Record, record_turns, split_records, write_instruction_shards
from model.compute import describe_cpu
from model.data import InstructionLoader
from model.gpt import GPT, IGNORE_INDEX, GPTConfig
from model.shards import DataError
from model.tokenizer import encode, get_tokenizer
from model.cli import HelpFormatter

MAX_LEN = 1024  # tokens per example, as prepare_dolly.py's default
BLOCK_SIZE = 1024
VAL_FRACTION = 0.1  # as prepare_dolly.py's default
DOLLY_RECORDS = 15011
WASTE_THRESHOLD = 0.30  # the bar for "too much padding"
PRODUCER = "bench/finetune_throughput.py"

# token-length distributions: (median, sigma of the log, lowest, highest); see the module docstring
INSTRUCTION = (15, 0.5, 3, 200)
CONTEXT = (100, 1.0, 5, 2500)
CONTEXT_SHARE = 0.3
RESPONSE = (60, 1.0, 1, 1000)

VARIANTS = {"random": False, "bucket": True}  # name -> InstructionLoader(bucket=...)


def one_token_words() -> np.ndarray:
    """Lower-case words that GPT-2 encodes as exactly one token when preceded by a space."""
    enc = get_tokenizer()
    words = []
    for token in range(enc.n_vocab - 1):
        piece = enc.decode_single_token_bytes(token)
        if re.fullmatch(rb" [a-z]{2,10}", piece) and len(encode(piece.decode())) == 1:
            words.append(piece.decode())
    return np.array(words)


def lognormal_lengths(rng: np.random.Generator, n: int, shape: tuple[int, float, int, int]) -> np.ndarray:
    median, sigma, low, high = shape
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def synth_records(n: int, seed: int) -> list[Record]:
    """n Dolly-shaped records of random one-token words, seeded."""
    rng = np.random.default_rng(seed)
    words = one_token_words()
    instruction = lognormal_lengths(rng, n, INSTRUCTION)
    context = np.where(rng.random(n) < CONTEXT_SHARE, lognormal_lengths(rng, n, CONTEXT), 0)
    response = lognormal_lengths(rng, n, RESPONSE)

    def text(length: int) -> str:
        return "".join(rng.choice(words, length))  # each word carries its leading space

    return [Record(text(i), text(c) if c else "", text(r)) for i, c, r in zip(instruction, context, response)]


def prepare_shards(out_dir: Path, records: int, seed: int) -> dict:
    """Write synthetic records as masked instruction shards with the repo's pipeline; return the manifest."""
    splits = split_records([record_turns(r) for r in synth_records(records, seed)], VAL_FRACTION, seed)
    return write_instruction_shards(
        out_dir, splits, producer=PRODUCER, source=f"synthetic Dolly-shaped records, seed {seed}",
        settings={"val_fraction": VAL_FRACTION, "seed": seed, "max_len": MAX_LEN}, invalid_skipped=0,
        max_len=MAX_LEN, shard_size=100_000_000,
    )


def row_lengths(y: torch.Tensor) -> torch.Tensor:
    """Positions of each row that belong to its example: through its last target (its closing token)."""
    is_target = y != IGNORE_INDEX
    last = y.size(1) - 1 - is_target.flip(1).int().argmax(1)
    return torch.where(is_target.any(1), last + 1, 0)


def epoch_stats(loader: InstructionLoader) -> dict:
    """Width, computed and padding positions and targets of every batch of one epoch of `loader`."""
    loader.reset()
    width, padding, targets = [], [], []
    for _ in range(loader.num_batches()):
        _, y = loader.next_batch()
        width.append(y.size(1))
        padding.append(y.numel() - row_lengths(y).sum().item())
        targets.append((y != IGNORE_INDEX).sum().item())
    width, padding, targets = np.array(width), np.array(padding), np.array(targets)
    computed = loader.B * width
    return {"width": width, "computed": computed, "padding": padding, "targets": targets,
            "waste": padding.sum() / computed.sum()}


def pick_batches(widths: np.ndarray, steps: int) -> list[int]:
    """Indices (in epoch order) of `steps` batches at evenly spaced quantiles of padded width."""
    by_width = np.argsort(widths, kind="stable")
    return sorted(int(by_width[int((k + 0.5) * len(widths) / steps)]) for k in range(steps))  # distinct: steps <= batches


def fetch(loader: InstructionLoader, indices: list[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of epoch 0 at `indices`, on the device."""
    loader.reset()
    wanted, batches = set(indices), []
    for i in range(max(indices) + 1):
        x, y = loader.next_batch()
        if i in wanted:
            batches.append((x.to(device), y.to(device)))
    return batches


def make_step(config: GPTConfig, seed: int, device: torch.device, dtype: str):
    """A function that runs one fine-tuning step of a fresh GPT on one padded micro-batch (x, y)."""
    torch.manual_seed(seed)
    model = GPT(config).to(device).train()
    optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=5e-5, betas=(0.9, 0.95), device_type=device.type)

    def step(x: torch.Tensor, y: torch.Tensor, n_targets: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            _, loss_sum = model(x, y, reduction="sum")
        (loss_sum / max(1, n_targets)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def measure(steps: dict, batches: dict[str, list], warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per micro-batch of each variant: warmup untimed steps each (cycling through its batches),
    then batch i of every variant in turn."""
    names = list(steps)
    n = len(batches[names[0]])
    schedule = [(i % n, False) for i in range(warmup)] + [(i, True) for i in range(n)]
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, timed in schedule:
        for name in names:
            x, y, n_targets = batches[name][i]
            start = time.perf_counter()
            steps[name](x, y, n_targets)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the GPU runs ahead of the host: time its work, not the launches
            if timed:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = parser.add_argument_group("data and batching")
    g.add_argument("--records", type=int, default=DOLLY_RECORDS, help="synthetic records (Dolly has 15011); 10%% are held out")
    g.add_argument("--batch_size", type=int, default=8, help="examples per micro-batch (finetune_dolly.py's default)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the records, the split, the loaders' order and the weights")
    g = parser.add_argument_group("model and device")
    g.add_argument("--n_layer", type=int, default=6, help="transformer blocks of the GPT")
    g.add_argument("--n_embd", type=int, default=384, help="width of the GPT")
    g.add_argument("--n_head", type=int, default=6, help="attention heads of the GPT")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="0.1 is finetune_dolly.py's; on CPU it puts attention on the slow math kernel (see above)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 = forward under bf16 autocast")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    g = parser.add_argument_group("how long")
    g.add_argument("--steps", type=int, default=6, help="timed micro-batches per variant, at quantiles of width; 0 = padding only")
    g.add_argument("--warmup", type=int, default=1, help="untimed micro-batches per variant first")
    args = parser.parse_args()
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable
    if args.records < 20 or args.batch_size < 1 or args.steps < 0 or args.warmup < 0:
        parser.error("--records must be >= 20, --batch_size >= 1, --steps and --warmup >= 0")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training sets it
    B = args.batch_size

    with tempfile.TemporaryDirectory(prefix="finetune_throughput_") as data_dir:
        start = time.perf_counter()
        manifest = prepare_shards(Path(data_dir), args.records, args.seed)
        prep_s = time.perf_counter() - start
        try:
            loaders = {
                name: InstructionLoader(data_dir, "train", B, bucket=bucket, seed=args.seed, block_size=BLOCK_SIZE)
                for name, bucket in VARIANTS.items()
            }
        except DataError as e:  # e.g. fewer train examples than one micro-batch
            parser.error(str(e))
        if args.steps > loaders["random"].num_batches():
            parser.error(f"--steps {args.steps} is more than the {loaders['random'].num_batches()} batches of an epoch")
        stats = {name: epoch_stats(loader) for name, loader in loaders.items()}
        lengths = loaders["random"].lengths
        c = manifest["counts"]["train"]
        gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}{gpu}, {args.dtype}\n"
            f"data: {args.records} synthetic Dolly-shaped records -> {c['examples']} train examples in {prep_s:.0f} s "
            f"({c['truncated']} with context cut to max_len {MAX_LEN}, {c['dropped']} dropped); tokens per example "
            f"median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, p90 {np.percentile(lengths, 90):.0f}, "
            f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}; response share {c['response_tokens'] / c['tokens']:.0%}\n"
            f"batches: B={B}, {loaders['random'].num_batches()} per epoch, seed {args.seed}, "
            f"bucket window {InstructionLoader.BUCKET_WINDOW} batches"
        )

        times, timed_stats = {}, {}
        if args.steps:
            config = GPTConfig(block_size=BLOCK_SIZE, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                               dropout=args.dropout)
            batches, steps = {}, {}
            for name, loader in loaders.items():
                picks = pick_batches(stats[name]["width"], args.steps)
                batches[name] = [(x, y, int((y != IGNORE_INDEX).sum())) for x, y in fetch(loader, picks, device)]
                timed_stats[name] = {key: stats[name][key][picks] for key in ("computed", "padding", "targets")}
                steps[name] = make_step(config, args.seed, device, args.dtype)
            print(
                f"model: GPT {args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, block {BLOCK_SIZE}, "
                f"dropout {args.dropout}; {args.warmup} warm-up + {args.steps} timed micro-batches per variant, round-robin"
            )
            times = measure(steps, batches, args.warmup, device)
            del steps

    # one row per variant, then bucket/random: epoch columns (no model), then the timed sample's
    header = (f"{'variant':<14} {'pad waste':>9} {'mean width':>10} {'resp tok/batch':>14}  "
              f"{'sample waste':>12} {'median ms':>10} {'resp tok/s':>10} {'computed tok/s':>14}")
    print("\n" + header)
    cols = {}
    for name, st in stats.items():
        cols[name] = [st["waste"], st["width"].mean(), st["targets"].mean()]
        if name in times:
            t, ts = times[name], timed_stats[name]
            cols[name] += [ts["padding"].sum() / ts["computed"].sum(), statistics.median(t),
                           ts["targets"].sum() / sum(t), ts["computed"].sum() / sum(t)]
        w, width, per_batch, *timed = cols[name]
        line = f"{name:<14} {100 * w:>8.1f}% {width:>10.0f} {per_batch:>14.0f}  "
        if timed:
            sw, med, resp, comp = timed
            line += f"{100 * sw:>11.1f}% {1e3 * med:>10.0f} {resp:>10.0f} {comp:>14.0f}"
        print(line.rstrip())
    r = [b / a for a, b in zip(cols["random"], cols["bucket"])]
    line = f"{'bucket/random':<14} {r[0]:>8.2f}x {r[1]:>9.2f}x {r[2]:>13.2f}x  "
    if times:
        line += f"{r[3]:>11.2f}x {r[4]:>9.2f}x {r[5]:>9.2f}x {r[6]:>13.2f}x"
    print(line.rstrip())
    rate = {name: c[5] for name, c in cols.items() if len(c) > 3}

    random_waste, bucket_waste = stats["random"]["waste"], stats["bucket"]["waste"]
    verdict = "exceeds" if random_waste > WASTE_THRESHOLD else "is within"
    print(
        f"\nrandom order wastes {100 * random_waste:.1f}% of computed tokens on padding, which {verdict} the "
        f"{100 * WASTE_THRESHOLD:.0f}% bar; length bucketing brings it to {100 * bucket_waste:.1f}%"
        + (f", and response tokens/s to {rate['bucket'] / rate['random']:.2f}x random order's" if rate else "")
    )


if __name__ == "__main__":
    main()
