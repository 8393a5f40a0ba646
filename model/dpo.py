"""Preference-tune an instruction-tuned GPT with DPO (Direct Preference Optimization, Rafailov et al. 2023).

    python data_prep/prepare_preferences.py                       # Anthropic/hh-rlhf helpful-base -> data/preferences
    python model/dpo.py --sft_checkpoint checkpoints/dolly         # policy and frozen reference both start from it
    python model/dpo.py --resume auto                             # after an interruption: continues exactly
    torchrun --standalone --nproc_per_node=8 model/dpo.py --sft_checkpoint checkpoints/dolly

Each pair is a prompt with a chosen and a rejected reply. With log p(reply) summed over the reply's
tokens and its <|endoftext|>, and r = beta * (log p_policy - log p_reference) the implicit reward of
a reply, the loss of a pair is

    -log sigmoid(r(chosen) - r(rejected))          [+ sft_weight * the chosen reply's mean token NLL]

averaged over the pairs of the global batch. At step 0 the policy is the reference: every reward is
0 and the loss log 2. The optional NLL term (--sft_weight, as in RPO) keeps the chosen reply likely
in absolute terms: DPO alone can lower both replies' likelihood as long as the rejected falls
faster, which small models show as drift and repetition.

The reference is the starting checkpoint, frozen: its log-probs of every train and val pair are
computed once, before the first step (one forward pass over the data, a third of the cost of a
training epoch's forward and backward passes), and travel in every checkpoint of the run (8 bytes a
pair), with the sha256 of the shards they were computed on, so a resume does not recompute them, the
reference can never drift, and a resume on pairs prepared again is refused. A frozen copy of the
model would cost a second set of weights in memory (500 MB at 124M in float32) and a forward pass
per pair per epoch, more than this from the second epoch on, and nothing saved in the first.

Everything else is the one training loop (model/trainer.py): accumulation, DDP, clipping, warmup +
cosine, atomic checkpoints, SIGTERM/SIGINT -> save and exit, exact --resume auto, log.jsonl and the
report. Logged every step: loss, reward accuracy (the share of pairs whose chosen reward is higher, a
tie counting half), the mean chosen and rejected rewards and their margin; the same on the held-out
pairs every --eval_every steps (all of them by default: --val_steps counts batches of pairs sorted by
length, so fewer would be the shortest), with greedy answers to the first --num_samples val prompts and, with
--exact_match_data, held-out exact match as in finetune_dolly.py.

Defaults, for GPT-2 124M on hh-rlhf helpful-base (43.8k train pairs): beta 0.1, the DPO paper's for
its dialogue experiments on hh-rlhf; peak LR 5e-6, a tenth of SFT's 5e-5 (the paper used 1e-6 for
models of 2.8B and up; a small model moves less per step), with 150 warmup steps as the paper;
batches of 64 pairs as the paper; one epoch (about 680 steps), since a second mostly raises
train reward accuracy, not held-out; dropout 0, so the policy's log-probs at step 0 equal the
reference's (dropout would give them noise and the rewards a bias).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.exact_match import exact_match_evaluation, sample_answers
from model.checkpoint import model_from_checkpoint
from model.cli import HelpFormatter
from model.compute import Compute, cleanup, setup_compute
from model.data import MASKED_KINDS, PairLoader
from model.gpt import GPT, IGNORE_INDEX
from model.pretrained import load_pretrained, with_dropout
from model.shards import read_manifest
from model.trainer import (
    BETAS,
    Objective,
    accumulation_steps,
    add_epoch_batch_args,
    add_training_args,
    check_epoch_batch_args,
    check_resume_step,
    check_training_args,
    load_resume_checkpoint,
    resolve_dtype,
    steps_for_epochs,
    train,
)

FRESH_HINT = "run without --resume, and with --sft_checkpoint"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(
        parser, data_dir="data/preferences", out_dir="checkpoints/dpo", max_steps=0, max_lr=5e-6, warmup_steps=150,
        eval_every=100, val_steps=-1, save_every=200, max_steps_help="optimizer steps of the whole run; 0 = --epochs",
    )
    g = parser.add_argument_group("DPO")
    g.add_argument("--sft_checkpoint", default=None,
                   help="the instruction-tuned checkpoint (or run directory: its newest) that the policy starts from "
                        "and the frozen reference is")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the implicit KL penalty: the reward is beta * (log p_policy - log p_reference)")
    g.add_argument("--sft_weight", type=float, default=0.0,
                   help="add this times the chosen reply's mean token NLL to each pair's loss (0: pure DPO)")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of the policy while training; above 0 the step-0 rewards are no longer 0")
    add_epoch_batch_args(parser, unit="pairs", total_batch_size=64, epochs=1.0, batch_size_note=" (twice as many rows)")
    g = parser.add_argument_group("sample answers")
    g.add_argument("--num_samples", type=int, default=3, help="val prompts answered greedily at each evaluation")
    g.add_argument("--sample_tokens", type=int, default=96, help="most tokens per sample answer")
    g.add_argument("--exact_match_data", nargs="+", default=None,
                   help="jsonl files of held-out questions: every --eval_every steps, log the share answered "
                        "exactly (eval/exact_match.py)")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    check_epoch_batch_args(parser, args)
    if args.beta <= 0:
        parser.error(f"--beta must be > 0, got {args.beta}")
    if args.sft_weight < 0:
        parser.error(f"--sft_weight must be >= 0, got {args.sft_weight}")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    return args


def sequence_logps(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows,) float32: each row's log-probability of its targets (y != IGNORE_INDEX), summed.
    lm_head runs on target positions only (GPT.forward's return_logits=False)."""
    _, nll = module(x, y, reduction="none", return_logits=False)
    return -nll.sum(1)


def dpo_objective(beta: float, sft_weight: float) -> Objective:
    """DPO's loss over batches (x, y, pairs, reference) of PairLoader: the module docstring's formula,
    summed over the real pairs (pairs >= 0), with the reward figures to log."""

    def loss(module: nn.Module, batch: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, pairs, reference = batch
        logps = sequence_logps(module, x, y)
        n = len(pairs)
        chosen = beta * (logps[:n] - reference[:, 0])
        rejected = beta * (logps[n:] - reference[:, 1])
        margin = chosen - rejected
        losses = -F.logsigmoid(margin)
        if sft_weight:
            losses = losses - sft_weight * logps[:n] / (y[:n] != IGNORE_INDEX).sum(1).clamp(min=1)
        real = (pairs >= 0).float()  # an empty pair (the val split's last batch) has rewards 0 and loss log 2: left out

        def total(t: torch.Tensor) -> torch.Tensor:
            return (t.detach().float() * real).sum()

        # a tie (every pair at step 0, where policy = reference) is a coin flip, not a miss
        figures = {"reward_accuracy": total((margin > 0).float() + 0.5 * (margin == 0).float()), "reward_chosen": total(chosen),
                   "reward_rejected": total(rejected), "reward_margin": total(margin)}
        return (losses * real).sum(), figures

    return Objective(loss, lambda batch: int((batch[2] >= 0).sum()))


@torch.inference_mode()
def reference_logps(model: GPT, loader: PairLoader, compute: Compute, dtype: str) -> torch.Tensor:
    """(pairs, 2) float32 on the CPU: the model's summed log-probs of each pair's chosen and rejected reply,
    over one pass of an unshuffled loader. Each rank scores its own batches; one all-reduce gives
    every rank all of them."""
    model.eval()
    table = torch.zeros(loader.num_examples(), 2, device=compute.device)
    loader.reset()
    for _ in range(loader.num_batches()):
        x, y, pairs, _ = (t.to(compute.device) for t in loader.next_batch())
        with compute.autocast(dtype):
            logps = sequence_logps(model, x, y).float()
        real = pairs >= 0
        table[pairs[real]] = torch.stack([logps[: len(pairs)], logps[len(pairs) :]], 1)[real]
    compute.all_reduce(table)
    model.train()
    return table.cpu()


def data_fingerprint(data_dir: str) -> list[str]:
    """The sha256 of every shard of prepared pairs: a resume must read the pairs its reference was computed on."""
    shards = read_manifest(data_dir, MASKED_KINDS["preferences"][0])["shards"]  # the loaders have checked it is there
    return [h for e in shards for h in (e["sha256"], e["mask_sha256"])]


def starting_model(args: argparse.Namespace, resume_ckpt: dict | None) -> GPT:
    """The checkpoint's model when resuming; else the SFT checkpoint's, with --dropout set."""
    if resume_ckpt is not None:
        return model_from_checkpoint(resume_ckpt)
    if not args.sft_checkpoint:
        raise FileNotFoundError("no starting weights: pass --sft_checkpoint PATH (e.g. checkpoints/dolly), "
                                "or --resume auto to continue a run")
    base, _ = load_pretrained(args.sft_checkpoint)
    return with_dropout(base, args.dropout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute = setup_compute(args.device, args.seed)
    try:
        resume_ckpt = load_resume_checkpoint(args, compute, FRESH_HINT, "dpo")
        model = starting_model(args, resume_ckpt)
        grad_accum = accumulation_steps(args.total_batch_size, {"batch_size": args.batch_size, "ranks": compute.world_size})
        block = model.config.block_size
        train_loader = PairLoader(args.data_dir, "train", args.batch_size, compute.rank, compute.world_size,
                                  seed=args.seed, block_size=block)
        val_loader = PairLoader(args.data_dir, "val", args.batch_size, compute.rank, compute.world_size,
                                shuffle=False, block_size=block)
        exact_match = exact_match_evaluation(args.exact_match_data, compute) if args.exact_match_data else None
        steps_for_epochs(args, train_loader.num_batches(), grad_accum, compute)
        check_resume_step(resume_ckpt, args.max_steps)
        fingerprint = data_fingerprint(args.data_dir)
        if resume_ckpt is not None and resume_ckpt["reference_data"] != fingerprint:
            raise ValueError(f"{args.data_dir} does not hold the pairs this run's reference log-probs were computed on "
                             "(prepared again since?): resume with the run's own data, or start a new --out_dir")
        model.to(compute.device)
        dtype = resolve_dtype(args.dtype, compute.device)
        if resume_ckpt is not None:
            reference = resume_ckpt["reference_logps"]
        else:
            compute.print0(f"reference log-probs of {train_loader.num_examples()} train and {val_loader.num_examples()} "
                           "val pairs, from the starting weights")
            in_order = PairLoader(args.data_dir, "train", args.batch_size, compute.rank, compute.world_size, shuffle=False)
            reference = {"train": reference_logps(model, in_order, compute, dtype),
                         "val": reference_logps(model, val_loader, compute, dtype)}
    except (OSError, ValueError) as e:  # OSError: also a missing checkpoint; ValueError: also bad data
        compute.print0(f"error: {e}", file=sys.stderr)
        cleanup(compute)
        return 2
    train_loader.reference, val_loader.reference = reference["train"], reference["val"]
    torch.manual_seed(args.seed + compute.rank)  # dropout differs per rank; the init came from the checkpoint
    optimizer = model.configure_optimizer(args.weight_decay, args.max_lr, BETAS, compute.device.type)
    evaluations = []
    if args.num_samples:
        evaluations.append((args.eval_every, sample_answers(val_loader, args.num_samples, args.sample_tokens, compute)))
    if exact_match:
        evaluations.append((args.eval_every, exact_match))
    try:
        train(args, compute, model, optimizer, train_loader, val_loader, grad_accum=grad_accum, kind="dpo",
              resume_ckpt=resume_ckpt, evaluations=evaluations, objective=dpo_objective(args.beta, args.sft_weight),
              run_state={"reference_logps": reference, "reference_data": fingerprint})
    finally:
        cleanup(compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
