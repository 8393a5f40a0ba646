"""Pretrain GPT-2 on token shards made by data_prep/fineweb.py.

GPT-2 124M on FineWeb-Edu sample-10BT (the defaults: 0.5M-token batches, 19073 steps = 10B tokens):
    python data_prep/fineweb.py
    torchrun --standalone --nproc_per_node=8 model/train_gpt2.py      # 8 GPUs
    python model/train_gpt2.py                                         # 1 GPU (gradient accumulation x8)
After an interruption (SIGTERM/SIGINT save a checkpoint; a kill loses only the steps since the last one):
    torchrun --standalone --nproc_per_node=8 model/train_gpt2.py --resume auto

HellaSwag is scored every --hellaswag_every steps (downloaded once; --hellaswag_data for a local copy).

A tiny model on a 2-core CPU, offline, in minutes (or make demo: every stage at once):
    python data_prep/demo_corpus.py --out_dir data/tiny/source       # or any local text: --input my_text.txt
    python data_prep/fineweb.py --input data/tiny/source/pretrain.jsonl --out_dir data/tiny/shards --shard_size 100000
    python model/train_gpt2.py --data_dir data/tiny/shards --out_dir checkpoints/tiny \\
        --n_layer 4 --n_head 4 --n_embd 128 --seq_len 64 --batch_size 8 --total_batch_size 512 \\
        --max_steps 200 --warmup_steps 20 --max_lr 3e-3 --eval_every 50 --val_steps 8 --save_every 100 --hellaswag_every 0

Continue pretraining OpenAI's GPT-2 instead of random weights: --init_from gpt2 (or a local HF directory).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch

from eval.hellaswag import add_hellaswag_args, hellaswag_evaluation
from model.checkpoint import model_from_checkpoint
from model.cli import HelpFormatter
from model.compute import cleanup, setup_compute
from model.data import TokenShardLoader
from model.export_hf import load_hf_model
from model.gpt import GPT, GPTConfig
from model.pretrained import with_dropout
from model.shards import DataError
from model.trainer import (
    BETAS,
    add_training_args,
    check_resume_step,
    check_training_args,
    accumulation_steps,
    load_resume_checkpoint,
    train,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(
        parser, data_dir="data/fineweb_edu10B", out_dir="checkpoints/pretrain", max_steps=19073, max_lr=6e-4,
        warmup_steps=715, eval_every=250, val_steps=20, save_every=1000,
    )
    g = parser.add_argument_group("batch")
    g.add_argument("--batch_size", type=int, default=64, help="sequences per micro-batch per rank")
    g.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    g.add_argument("--total_batch_size", type=int, default=524288,
                   help="tokens per optimizer step; gradient accumulation = this / (batch_size * seq_len * ranks)")
    g = parser.add_argument_group("model (ignored with --resume, which takes the checkpoint's)")
    g.add_argument("--init_from", default="scratch",
                   help="scratch (random GPT-2 init), a Hugging Face GPT-2 name (gpt2, gpt2-medium, ...) or a local HF directory")
    g.add_argument("--n_layer", type=int, default=12, help="with --init_from, the pretrained model's shape is used")
    g.add_argument("--n_head", type=int, default=12)
    g.add_argument("--n_embd", type=int, default=768)
    g.add_argument("--dropout", type=float, default=0.0, help="also with --init_from (OpenAI's config says 0.1)")
    add_hellaswag_args(parser, every=250)
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    for name in ("batch_size", "seq_len", "total_batch_size", "n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    return args


def build_model(args: argparse.Namespace, resume_ckpt: dict | None) -> GPT:
    """The checkpoint's model when resuming, else OpenAI's weights or a fresh GPT-2 init."""
    if resume_ckpt is not None:
        return model_from_checkpoint(resume_ckpt)
    if args.init_from != "scratch":
        return with_dropout(load_hf_model(args.init_from), args.dropout)
    return GPT(GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                         dropout=args.dropout))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute = setup_compute(args.device, args.seed)
    try:
        resume_ckpt = load_resume_checkpoint(args, compute, "run without --resume to start a new run", "pretrain")
        check_resume_step(resume_ckpt, args.max_steps)
        model = build_model(args, resume_ckpt)
        if args.seq_len > model.config.block_size:
            raise ValueError(f"--seq_len {args.seq_len} exceeds the model's block_size {model.config.block_size}")
        grad_accum = accumulation_steps(
            args.total_batch_size, {"batch_size": args.batch_size, "seq_len": args.seq_len, "ranks": compute.world_size})
        loaders = [TokenShardLoader(args.data_dir, split, args.batch_size, args.seq_len, compute.rank,
                                    compute.world_size) for split in ("train", "val")]
        for loader in loaders:
            if loader.skipped:
                compute.print0(f"note: {', '.join(loader.skipped)} in {args.data_dir} hold fewer tokens than one "
                               "micro-batch of all ranks (batch_size * seq_len * ranks + 1): they are not read")
        if not loaders[0].complete:
            compute.print0(f"warning: {args.data_dir} is still being prepared (or its preparation was stopped): "
                           f"training on the {len(loaders[0].entries)} train shards finished so far")
        hellaswag = hellaswag_evaluation(args, compute)
    except (OSError, ValueError) as e:  # OSError: also the Hub out of reach for --init_from
        compute.print0(f"error: {e}", file=sys.stderr)
        cleanup(compute)
        return 2
    # the data order is fixed by the loader; this seeds what varies per rank (dropout) after the shared init
    torch.manual_seed(args.seed + compute.rank)
    model.to(compute.device)
    optimizer = model.configure_optimizer(args.weight_decay, args.max_lr, BETAS, compute.device.type)
    try:
        train(args, compute, model, optimizer, *loaders, grad_accum=grad_accum, kind="pretrain", resume_ckpt=resume_ckpt,
              evaluations=[hellaswag] if hellaswag else [])
    except DataError as e:  # a resume position these shards lack, or a shard damaged since the run began
        compute.print0(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
