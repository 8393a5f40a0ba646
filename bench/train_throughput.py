"""Training throughput of our GPT against transformers' GPT2LMHeadModel, same shapes, same batches.

Claim under test: one full training step (forward + loss + backward + AdamW step) of our GPT processes
at least 1.25x the tokens per second of HF's GPT-2 on a 2-core CPU, at a small shape and at GPT-2 124M.

    python bench/train_throughput.py                       # both shapes, B=8, T=256, our model eager
    python bench/train_throughput.py --compile             # our model under torch.compile, as --compile trains
    python bench/train_throughput.py --malloc keep         # freed memory kept, as CPU training does
    python bench/train_throughput.py --shapes small --steps 20 --threads 2
    python bench/train_throughput.py --device cuda --dtype bfloat16 --compile --shapes 124M --batch_size 16 --seq_len 1024

Our model runs eagerly unless --compile, as model/train_gpt2.py does: on CPU compiling gains nothing
over the fused loss and oneDNN products (README, "Benchmarks"); on a GPU it is what training uses.

On CUDA each step ends with torch.cuda.synchronize(), so the host clock times the GPU's work, and the
table adds MFU: model FLOPs per token (GPT.flops_per_token, 6N + attention) x tokens/s over the GPU's
dense bf16 peak. Both models count the same FLOPs (ours, padded vocab included), so MFU ranks them
exactly as tokens/s does.

What is timed, per step and per model, with time.perf_counter around the whole step:
  ours  GPT (vocab padded to 50304), under torch.compile with --compile; loss from targets = the
        inputs shifted by one (the loss-only forward where model/train_gpt2.py uses it: eager on CPU,
        lm_head fused with the loss, model/lm_loss.py), optimizer from GPT.configure_optimizer (fused AdamW on CPU)
  HF    GPT2LMHeadModel (vocab 50257), attn_implementation="sdpa", all dropouts 0, labels = input ids
        (HF shifts them inside), use_cache=False as for any training, torch.optim.AdamW with its
        defaults (on CPU those resolve to the per-parameter loop; on CUDA to the foreach kernels)
--dtype bfloat16 runs both forwards under the same bf16 autocast, as training does.
--malloc keep first has glibc keep freed memory for reuse, as the training loop does on CPU
(model/compute.keep_freed_cpu_memory): it is process-wide, so HF's steps get it too, and neither then
page-faults its large tensors in afresh every step. HF gains more from it (its unfused cross-entropy
allocates more), so the ratio is lower there; by default glibc is left as it comes.
Both see the same random token batches (seeded), B x T tokens per step. Steps alternate ours, HF, ours,
HF, ... in one process, after --warmup untimed steps each (compilation happens there), so drift in
clock speed or machine load hits both alike. tokens/s = B * T / median step time. On a shared VM the
absolute step times drift by tens of percent from run to run; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
import transformers

from model.compute import bf16_peak_flops, describe_cpu, keep_freed_cpu_memory
from model.gpt import GPT, GPTConfig
from model.tokenizer import VOCAB_SIZE
from model.trainer import loss_only_forward

# name -> (n_layer, n_embd, n_head)
SHAPES = {"small": (6, 384, 6), "124M": (12, 768, 12)}
HF_LABEL = "HF GPT2LMHeadModel"


Step = Callable[[torch.Tensor], None]


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def our_step(config: GPTConfig, compile_model: bool, device: torch.device, dtype: str) -> Step:
    """A function that runs one training step of a fresh GPT on a (B, T + 1) batch of token ids."""
    model = GPT(config).to(device).train()
    optimizer = model.configure_optimizer(
        weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type=device.type
    )
    forward = torch.compile(model) if compile_model else model
    return_logits = not loss_only_forward("pretrain", device.type, compile_model)  # as model/train_gpt2.py calls it

    def step(batch: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            _, loss = forward(batch[:, :-1], batch[:, 1:], return_logits=return_logits)
        loss.backward()
        optimizer.step()

    return step


def hf_step(config: GPTConfig, device: torch.device, dtype: str) -> Step:
    """A function that runs one training step of a fresh transformers GPT-2 of the same shape on a
    (B, T + 1) batch of token ids."""
    hf_config = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)

    def step(batch: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        inputs = batch[:, :-1]  # the same T tokens our model reads; HF shifts the labels itself
        with autocast(device, dtype):
            loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()

    return step


def measure(steps: dict[str, Step], batches: list[torch.Tensor], warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each model, run round-robin over the same batches after warmup steps each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if batch.is_cuda:
                torch.cuda.synchronize()  # the GPU runs ahead of the host: time its work, not the launches
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description="Tokens/s of a training step: our GPT vs transformers' GPT-2.")
    # what to measure
    parser.add_argument(
        "--shapes", default="small,124M", help=f"comma-separated names; (n_layer, n_embd, n_head): {SHAPES}"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step (B)")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (T)")
    parser.add_argument(
        "--compile", action="store_true", help="run our model under torch.compile (default: eagerly)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 = both forwards under bf16 autocast"
    )
    # how long
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and shape")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per model first (compilation happens there)"
    )
    parser.add_argument(
        "--malloc", default="default", choices=["default", "keep"],
        help="keep: glibc keeps freed CPU memory for reuse, as model/trainer.py has it (both models); default: as it comes",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--seed", type=int, default=1337, help="seed of weights and batches")
    args = parser.parse_args()
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    if args.steps < 1 or args.warmup < (1 if args.compile else 0):
        parser.error("--steps must be >= 1, and --warmup >= 1 with --compile (the first compiled step compiles)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    kept = device.type == "cpu" and args.malloc == "keep" and keep_freed_cpu_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training sets it
        gpu = torch.cuda.get_device_name(device)
        peak = bf16_peak_flops(gpu)
    else:
        gpu, peak = "", None
    B, T = args.batch_size, args.seq_len
    ours_label = "ours (torch.compile)" if args.compile else "ours (eager)"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"B={B} T={T}, {args.dtype}, {'freed memory kept' if kept else 'default malloc'}, {args.warmup} warm-up + {args.steps} timed steps per model, {device} {gpu}"
    )
    rows = []
    for shape in shapes:
        n_layer, n_embd, n_head = SHAPES[shape]
        config = GPTConfig(block_size=T, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        torch.manual_seed(args.seed)
        steps = {
            ours_label: our_step(config, args.compile, device, args.dtype),
            HF_LABEL: hf_step(config, device, args.dtype),
        }
        gen = torch.Generator().manual_seed(args.seed)
        batches = [
            torch.randint(0, VOCAB_SIZE, (B, T + 1), generator=gen).to(device)
            for _ in range(args.warmup + args.steps)
        ]
        times = measure(steps, batches, args.warmup)
        del steps  # free one shape's models and optimizer states before the next shape's
        with torch.device("meta"):  # only the parameter count is needed: no memory, no init
            flops_per_token = GPT(config).flops_per_token(T)
        tokens_per_s = {name: B * T / statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            mfu = flops_per_token * tokens_per_s[name] / peak if peak else None
            rows.append((shape, name, 1e3 * statistics.median(t), 1e3 * min(t), 1e3 * max(t), tokens_per_s[name], mfu))
        ratio = tokens_per_s[ours_label] / tokens_per_s[HF_LABEL]
        rows.append((shape, "ratio ours/HF", None, None, None, ratio, None))

    print(f"\n{'shape':<6} {'model':<22} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'tokens/s':>10} {'MFU':>6}")
    for shape, name, med, lo, hi, value, mfu in rows:
        if med is None:
            print(f"{shape:<6} {name:<22} {'':>10} {'':>9} {'':>9} {value:>9.2f}x")
        else:
            mfu_text = f"{100 * mfu:5.1f}%" if mfu is not None else ""
            print(f"{shape:<6} {name:<22} {med:>10.1f} {lo:>9.1f} {hi:>9.1f} {value:>10.0f} {mfu_text:>6}")


if __name__ == "__main__":
    main()
