"""Instruction-tune a GPT on masked instruction shards (data_prep/prepare_dolly.py, prepare_custom_dataset.py
or prepare_chat.py): single instructions and whole conversations alike.

    python data_prep/prepare_dolly.py
    python model/finetune_dolly.py --pretrained_checkpoint checkpoints/pretrain/step_019073.pt
    python model/finetune_dolly.py --init_from gpt2            # or start from OpenAI's GPT-2 124M
    python model/finetune_dolly.py --resume auto               # after an interruption: continues exactly
    torchrun --standalone --nproc_per_node=8 model/finetune_dolly.py --pretrained_checkpoint ...

The loss is the mean over trained reply tokens (and each closing <|endoftext|>) only: prompts, replies
kept as history (weight 0) and padding are masked out; a conversation trains all its replies in one
row. A micro-batch is --batch_size whole examples padded to the longest; examples
are grouped by length within a shuffled window (see model/data.py) so little compute goes to padding.
--total_batch_size counts examples per optimizer step. The training loop is pretraining's
(model/trainer.py): accumulation, DDP, warmup + cosine, clipping, atomic checkpoints, SIGTERM/SIGINT ->
save and exit, exact --resume auto.

Defaults, for GPT-2 124M on Dolly's 13.5k training examples: 3 epochs of 32-example steps (about 1270
steps), peak LR 5e-5 (a tenth of pretraining's: the aim is to teach the format, not to overwrite what
pretraining learned), 50 warmup steps, dropout 0.1 on this small set. Every --eval_every steps (and
at step 0, to show the base model) the run logs the val loss over every val response token and the
greedy answers to the first --num_samples val instructions; --hellaswag_every N also scores HellaSwag
(eval/hellaswag.py), to show what tuning costs in general knowledge.

--compile works, but the padded length changes from batch to batch, which makes torch.compile recompile
until it switches to dynamic shapes; it pays off on long runs only.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch

from eval.exact_match import exact_match_evaluation, sample_answers
from eval.hellaswag import add_hellaswag_args, hellaswag_evaluation
from model.checkpoint import model_from_checkpoint
from model.cli import HelpFormatter
from model.compute import cleanup, setup_compute
from model.data import InstructionLoader
from model.gpt import GPT
from model.pretrained import load_pretrained, with_dropout
from model.trainer import (
    BETAS,
    accumulation_steps,
    add_epoch_batch_args,
    add_training_args,
    check_epoch_batch_args,
    check_resume_step,
    check_training_args,
    load_resume_checkpoint,
    steps_for_epochs,
    train,
)

FRESH_HINT = "run without --resume, or pass --pretrained_checkpoint"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(
        parser, data_dir="data/dolly", out_dir="checkpoints/dolly", max_steps=0, max_lr=5e-5, warmup_steps=50,
        eval_every=100, val_steps=-1, save_every=200, max_steps_help="optimizer steps of the whole run; 0 = --epochs",
    )
    g = parser.add_argument_group("starting weights (ignored with --resume, which takes the checkpoint's)")
    g.add_argument("--pretrained_checkpoint", default=None,
                   help="a checkpoint of any stage (or a run directory: its newest); weights only, fresh optimizer")
    g.add_argument("--init_from", default=None, help="a Hugging Face GPT-2 name (gpt2, gpt2-medium, ...) or a local HF directory")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout while tuning (the saved model keeps it; eval ignores it). On CPU, attention dropout "
                        "sends attention to PyTorch's slow math kernel: --dropout 0 is several times faster there")
    g = add_epoch_batch_args(parser, unit="examples", total_batch_size=32, epochs=3.0)
    g.add_argument("--no_bucket", action="store_true", help="batch examples in plain random order, not grouped by length")
    g = parser.add_argument_group("sample answers")
    g.add_argument("--num_samples", type=int, default=3, help="val instructions answered greedily at each evaluation")
    g.add_argument("--sample_tokens", type=int, default=96, help="most tokens per sample answer")
    g.add_argument("--exact_match_data", nargs="+", default=None,
                   help="jsonl files of held-out questions (instruction records or conversations, e.g. "
                        "data_prep/demo_corpus.py's heldout.jsonl and heldout_chat.jsonl): every --eval_every steps, "
                        "log the share answered exactly (eval/exact_match.py)")
    add_hellaswag_args(parser, every=0)  # e.g. --hellaswag_every 200: what tuning costs in general knowledge
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    check_epoch_batch_args(parser, args)
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.pretrained_checkpoint and args.init_from:
        parser.error("pass one of --pretrained_checkpoint and --init_from, not both")
    return args


def starting_model(args: argparse.Namespace, resume_ckpt: dict | None) -> GPT:
    """The checkpoint's model when resuming; else the pretrained weights, with --dropout set."""
    if resume_ckpt is not None:
        return model_from_checkpoint(resume_ckpt)
    if not (args.pretrained_checkpoint or args.init_from):
        raise FileNotFoundError(
            "no starting weights: pass --pretrained_checkpoint PATH (e.g. checkpoints/pretrain), "
            "--init_from gpt2, or --resume auto to continue a run"
        )
    base, _ = load_pretrained(args.pretrained_checkpoint, args.init_from)
    return with_dropout(base, args.dropout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute = setup_compute(args.device, args.seed)
    try:
        resume_ckpt = load_resume_checkpoint(args, compute, FRESH_HINT, "sft")
        model = starting_model(args, resume_ckpt)
        grad_accum = accumulation_steps(args.total_batch_size, {"batch_size": args.batch_size, "ranks": compute.world_size})
        block = model.config.block_size
        train_loader = InstructionLoader(args.data_dir, "train", args.batch_size, compute.rank, compute.world_size,
                                         bucket=not args.no_bucket, seed=args.seed, block_size=block)
        val_loader = InstructionLoader(args.data_dir, "val", args.batch_size, compute.rank, compute.world_size,
                                       shuffle=False, block_size=block)
        hellaswag = hellaswag_evaluation(args, compute)
        exact_match = exact_match_evaluation(args.exact_match_data, compute) if args.exact_match_data else None
        steps_for_epochs(args, train_loader.num_batches(), grad_accum, compute)
        check_resume_step(resume_ckpt, args.max_steps)
    except (OSError, ValueError) as e:  # OSError: also the Hub out of reach; ValueError: also bad data
        compute.print0(f"error: {e}", file=sys.stderr)
        cleanup(compute)
        return 2
    torch.manual_seed(args.seed + compute.rank)  # dropout differs per rank; the init came from the checkpoint
    model.to(compute.device)
    optimizer = model.configure_optimizer(args.weight_decay, args.max_lr, BETAS, compute.device.type)
    evaluations = [hellaswag] if hellaswag else []
    if args.num_samples:
        evaluations.append((args.eval_every, sample_answers(val_loader, args.num_samples, args.sample_tokens, compute)))
    if exact_match:
        evaluations.append((args.eval_every, exact_match))
    try:
        train(args, compute, model, optimizer, train_loader, val_loader, grad_accum=grad_accum, kind="sft",
              resume_ckpt=resume_ckpt, evaluations=evaluations)
    finally:
        cleanup(compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
