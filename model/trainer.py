"""The training loop, written once, for pretraining (train_gpt2.py), instruction tuning
(finetune_dolly.py) and preference tuning (dpo.py).

Each optimizer step takes `grad_accum` micro-batches per rank, averages the loss over every unit of
the global batch (target tokens for language modelling, pairs for DPO; exactly, whatever the ranks
and micro-steps, so 2 ranks x 1 micro-step equal 1 rank x 2), clips the gradient norm, sets the
warmup + cosine learning rate and steps AdamW. What is minimised is an Objective the script hands
over: the language-model loss by default, DPO's from model/dpo.py.
Around that: validation and evaluation hooks on the uncompiled model, atomic checkpoints, a JSONL
log, and SIGTERM/SIGINT handling that saves a checkpoint and exits 0, for preemptible nodes.

Resume is exact: a checkpoint holds the weights, the optimizer, the loader's position and every
rank's RNG states, so a resumed run ends with the same weights as an uninterrupted one.

A script supplies the model, the optimizer, loaders whose next_batch() returns a tuple of tensors
(x, y, ...) with y equal to IGNORE_INDEX wherever no loss is wanted, and the number of micro-steps
per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from eval.report import write_report
from model.atomic import remove_stale_temp_files
from model.checkpoint import (
    checkpoint_path,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    list_checkpoints,
    model_state,
    prune_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.compute import Compute, check_device, keep_freed_cpu_memory
from model.cpu_linear import native_bf16
from model.gpt import GPT, IGNORE_INDEX
from model.shards import DataError

BETAS = (0.9, 0.95)  # GPT-3's AdamW betas, as in GPT-2 reproductions


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def reset(self) -> None: ...
    def num_batches(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


# An evaluation run every `every` steps on the bare model: (every, fn(model) -> metrics to log).
Evaluation = tuple[int, Callable[[GPT], dict]]


@dataclass
class Objective:
    """What training minimises, one micro-batch at a time.

    loss(module, batch) returns the loss summed over the batch's units and {name: summed value} of
    figures to log beside it; count(batch) is the number of units. The loop divides both by the
    units of the whole global step, so every unit weighs the same whatever the ranks and micro-steps.
    """

    loss: Callable[[nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[tuple], int]


def language_model_objective(return_logits: bool = False) -> Objective:
    """Cross-entropy over every target token (y != IGNORE_INDEX): pretraining and instruction tuning.
    return_logits=False runs lm_head only where there are targets (loss_only_forward says when)."""

    def loss(module: nn.Module, batch: tuple) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return module(x, y, reduction="sum", return_logits=return_logits)[1], {}

    return Objective(loss, lambda batch: int((batch[1] != IGNORE_INDEX).sum()))


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    data_dir: str,
    out_dir: str,
    max_steps: int,
    max_lr: float,
    warmup_steps: int,
    eval_every: int,
    val_steps: int,
    save_every: int,
    max_steps_help: str = "optimizer steps of the whole run",
) -> None:
    """The flags every training script shares; the keyword arguments are the script's defaults."""
    g = parser.add_argument_group("run")
    g.add_argument("--data_dir", default=data_dir, help="prepared shards (with manifest.json)")
    g.add_argument("--out_dir", default=out_dir, help="run directory: checkpoints, log.jsonl, args.json")
    g.add_argument("--resume", default=None, help='"auto" = the newest complete checkpoint in --out_dir, or a checkpoint path')
    g.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu; or e.g. cuda:1")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="autocast dtype of the forward pass; auto = bfloat16 on CUDA, float32 elsewhere. On a CPU "
                        "that multiplies bf16 natively (AVX512-BF16 or AMX) bfloat16 steps were about 1.5x faster on an AMD "
                        "EPYC Zen 4 (slower on an Intel Xeon without AMX); on other CPUs bfloat16 runs emulated, slower "
                        "than float32 (a note says so)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training module (evaluation uses the uncompiled one)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the initialisation and of dropout (rank r uses seed + r)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=int, default=max_steps, help=max_steps_help)
    g.add_argument("--max_lr", type=float, default=max_lr, help="peak learning rate, reached after warmup")
    g.add_argument("--min_lr_frac", type=float, default=0.1, help="the cosine decays to this fraction of --max_lr")
    g.add_argument("--warmup_steps", type=int, default=warmup_steps, help="linear warmup steps")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay of >= 2-D parameters")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = no clipping")
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=int, default=eval_every, help="validation loss every N steps; 0 = only at the end")
    g.add_argument("--val_steps", type=int, default=val_steps, help="micro-batches per rank per validation (N ranks read N times the tokens); -1 = the whole val split, "
                        "as is any number beyond it (each batch is read once)")
    g.add_argument("--save_every", type=int, default=save_every, help="checkpoint every N steps; 0 = only at the end")
    g.add_argument("--keep_last", type=int, default=3, help="keep the newest N checkpoints; 0 = keep all")
    g.add_argument("--log_every", type=int, default=1,
                   help="print a step's line every N steps (log.jsonl gets every step; a terminal also shows a progress bar)")


def add_epoch_batch_args(parser: argparse.ArgumentParser, *, unit: str, total_batch_size: int, epochs: float,
                         batch_size_note: str = "") -> argparse._ArgumentGroup:
    """The batch flags of the tuning stages, which count whole examples (or pairs) of the given unit
    rather than tokens, and may run for --epochs instead of --max_steps; check_epoch_batch_args checks
    them. Returns the group, for a stage's own batch flags."""
    g = parser.add_argument_group("batch")
    g.add_argument("--batch_size", type=int, default=8, help=f"{unit} per micro-batch per rank{batch_size_note}")
    g.add_argument("--total_batch_size", type=int, default=total_batch_size,
                   help=f"{unit} per optimizer step; gradient accumulation = this / (batch_size * ranks)")
    g.add_argument("--epochs", type=float, default=epochs, help=f"passes over the training {unit}, when --max_steps is 0")
    return g


def check_epoch_batch_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse batch flags (add_epoch_batch_args) that cannot make a run (argparse's usage error)."""
    for name in ("batch_size", "total_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.epochs <= 0:
        parser.error("--epochs must be > 0")


def steps_for_epochs(args: argparse.Namespace, micro_batches: int, grad_accum: int, compute: Compute) -> None:
    """Set args.max_steps from --epochs when it is 0: enough optimizer steps to read the training
    split's micro_batches (per rank) epochs times."""
    if args.max_steps == 0:
        args.max_steps = math.ceil(args.epochs * micro_batches / grad_accum)
        compute.print0(f"{args.epochs:g} epochs of {micro_batches} micro-batches = {args.max_steps} steps")


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag values the loop cannot honour, before any work, with the flag named (exit 2)."""
    for name in ("max_steps", "max_lr", "warmup_steps", "eval_every", "save_every", "keep_last", "grad_clip"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.log_every < 1:
        parser.error(f"--log_every must be >= 1, got {args.log_every}")
    if args.val_steps == 0 or args.val_steps < -1:
        parser.error(f"--val_steps must be >= 1 or -1 (the whole split), got {args.val_steps}")
    if not 0 <= args.min_lr_frac <= 1:
        parser.error(f"--min_lr_frac must be within [0, 1], got {args.min_lr_frac}")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"--out_dir {args.out_dir} is a file: pass a directory for the run's checkpoints")
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"auto" is bfloat16 on a CUDA device that has it, float32 elsewhere: on CPU bf16 is faster only
    where the CPU multiplies it natively, and float32 keeps CPU runs exact, so there it is asked for."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def emulated_bf16_note(dtype: str, device: torch.device) -> str | None:
    """The line for a user who asked for bf16 on a CPU without native bf16: it runs (torch's generic
    kernels, or oneDNN's emulation), only slower than float32 would."""
    if dtype == "bfloat16" and device.type == "cpu" and not native_bf16():
        return ("note: --dtype bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX that oneDNN runs): "
                "it works, but emulated; float32 is faster here")
    return None


def get_lr(step: int, max_steps: int, max_lr: float, warmup_steps: int, min_lr_frac: float) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_frac * max_lr at max_steps."""
    min_lr = max_lr * min_lr_frac
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


SCRIPTS = {"pretrain": "model/train_gpt2.py", "sft": "model/finetune_dolly.py", "dpo": "model/dpo.py"}  # who writes each kind


def find_resume_checkpoint(resume: str | None, out_dir: str | Path, fresh_hint: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run into a directory that already holds checkpoints is refused rather than mixing two
    runs there. fresh_hint tells the user how to start anew when --resume auto finds nothing.
    """
    existing = list_checkpoints(out_dir)
    if resume in (None, "auto") and existing and not any(is_complete(p) for p in existing):
        raise ValueError(
            f"{out_dir} holds only incomplete checkpoints ({', '.join(p.name for p in existing)}), left by "
            "interrupted saves: delete them and start a new run, or choose another --out_dir"
        )
    if resume is None:
        if existing:
            raise ValueError(
                f"{out_dir} already holds {existing[-1].name}: pass --resume auto to continue that run, "
                "or choose another --out_dir"
            )
        return None
    if resume == "auto":
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume auto: no checkpoint in {out_dir} to resume: {fresh_hint}")
        return path
    return resolve_checkpoint(resume)  # a step_*.pt file, or a run directory's newest


def load_resume_checkpoint(args: argparse.Namespace, compute: Compute, fresh_hint: str, kind: str) -> dict | None:
    """The loaded checkpoint that --resume names (see find_resume_checkpoint), or None for a fresh run.

    Refused: a checkpoint of another script (kind), one without the training state, and resuming into
    an --out_dir whose checkpoints the run's own would mix with: those of another run, or later ones
    of this run (--keep_last would delete the wrong ones, --resume auto later pick the wrong newest).
    """
    path = find_resume_checkpoint(args.resume, args.out_dir, fresh_hint)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != kind:
        writer = SCRIPTS.get(ckpt.get("kind"), "another program")
        raise ValueError(f"{path} was written by {writer}, not {SCRIPTS[kind]}: resume it with {writer}")
    if not {"optimizer", "loader", "rng"} <= ckpt.keys():
        raise ValueError(f"{path} holds weights only, no training state (optimizer, loader position, RNG) to resume")
    own = path.resolve().parent == Path(args.out_dir).resolve()
    others = [p for p in list_checkpoints(args.out_dir) if is_complete(p) and (not own or checkpoint_step(p) > ckpt["step"])]
    if others:
        whose = f"later than step {ckpt['step']} of {path}" if own else f"of another run than {path}'s"
        raise ValueError(
            f"{args.out_dir} already holds {others[-1].name}, {whose}: choose another --out_dir for the resumed "
            "run, or move those checkpoints away"
        )
    compute.print0(f"resuming from {path} (step {ckpt['step']})")
    return ckpt


def check_resume_step(ckpt: dict | None, max_steps: int) -> None:
    """Refuse to resume a run already past --max_steps: it would do nothing and report success."""
    if ckpt is not None and ckpt["step"] > max_steps:
        raise ValueError(f"the checkpoint is at step {ckpt['step']}, past --max_steps {max_steps}: pass a larger --max_steps")


def accumulation_steps(total_batch_size: int, factors: dict[str, int]) -> int:
    """Micro-steps per optimizer step: --total_batch_size over the product of factors, which must divide it.

    factors names what one micro-step of all ranks holds, e.g. {"batch_size": 8, "ranks": 2}.
    """
    per_micro = math.prod(factors.values())
    if total_batch_size % per_micro:
        raise ValueError(
            f"--total_batch_size {total_batch_size} must be a multiple of {' * '.join(factors)} = "
            f"{' * '.join(map(str, factors.values()))} = {per_micro}"
        )
    return total_batch_size // per_micro


def restore_training_state(ckpt: dict, compute: Compute, optimizer: torch.optim.Optimizer, train_loader: Loader) -> int:
    """Put the optimizer, loader and RNGs back where a checkpoint left them; return its step.

    The optimizer's moments come back, its settings stay this run's: as the learning rate (set every
    step from the flags), a --weight_decay changed for the resumed run applies."""
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = decay
    train_loader.load_state_dict(ckpt["loader"])
    if len(ckpt["rng"]) == compute.world_size:
        set_rng_state(ckpt["rng"][compute.rank])
    else:
        compute.print0(
            f"warning: the checkpoint was written by {len(ckpt['rng'])} ranks and this run has "
            f"{compute.world_size}: RNG streams restart, so dropout masks will differ from an uninterrupted run"
        )
    return ckpt["step"]


class StopSignal:
    """SIGTERM and SIGINT set a flag that the loop reads between steps (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, compute: Compute) -> bool:
        """True on every rank once any rank got a signal, so all stop at the same step."""
        flag = torch.tensor(float(self.signum is not None), device=compute.device)
        return compute.all_reduce(flag, "max").item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def trim_log(path: Path, step: int) -> None:
    """Drop what a log holds beyond `step` (training records after it, evaluations at or after it):
    the resumed run redoes that work and logs it again."""
    if not path.is_file():
        return
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write: the resumed run redoes its step
            print(f"warning: dropping a damaged line of {path}: {line[:80]!r}")
    kept = [r for r in records if r["step"] < step or (r["step"] == step and "train_loss" in r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_log(path: Path, record: dict) -> None:
    """One JSON object per line: easy to plot, and safe to append to after a resume."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def loss_only_forward(kind: str, device_type: str, compiled: bool) -> bool:
    """Whether training steps call the model with return_logits=False.

    The loss-only forward gathers the positions that have a target and runs lm_head on those alone:
    most of the work saved in instruction tuning, where only response tokens are targets. Pretraining
    targets every position; there the gather pays off only on CPU without compile, where the loss-only
    path is fused with lm_head (model/lm_loss.py); on GPUs it would add a host sync, under compile a
    graph break."""
    return kind != "pretrain" or (device_type == "cpu" and not compiled)


@torch.inference_mode()
def evaluate_loss(model: GPT, loader: Loader, steps: int, compute: Compute, dtype: str, objective: Objective) -> dict:
    """{"val_loss": mean loss, "val_NAME": mean of each figure the objective logs} over the units of
    `steps` micro-batches per rank (-1, or more than the split holds: the whole split, each batch once)."""
    model.eval()
    loader.reset()
    totals, names = None, []
    for _ in range(loader.num_batches() if steps == -1 else min(steps, loader.num_batches())):
        batch = tuple(t.to(compute.device) for t in loader.next_batch())
        with compute.autocast(dtype):
            loss_sum, figures = objective.loss(model, batch)
        names = list(figures)
        step_totals = torch.stack([loss_sum.float(), torch.tensor(float(objective.count(batch)), device=compute.device),
                                   *(v.float() for v in figures.values())])
        totals = step_totals if totals is None else totals + step_totals
    compute.all_reduce(totals)
    model.train()
    mean = (totals / totals[1].clamp(min=1)).tolist()
    return {"val_loss": mean[0]} | {f"val_{name}": v for name, v in zip(names, mean[2:])}


def train(
    args: argparse.Namespace,
    compute: Compute,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    train_loader: Loader,
    val_loader: Loader,
    grad_accum: int,
    kind: str,
    resume_ckpt: dict | None = None,
    evaluations: list[Evaluation] = (),
    objective: Objective | None = None,
    run_state: dict | None = None,
) -> None:
    """Train from step 0, or from resume_ckpt, through args.max_steps; the last pass only evaluates and saves.

    objective: what to minimise (default: the language-model loss). run_state: what else every
    checkpoint carries for a resume (DPO's reference log-probs)."""
    out_dir = Path(args.out_dir)
    dtype = resolve_dtype(args.dtype, compute.device)
    if note := emulated_bf16_note(dtype, compute.device):
        compute.print0(note)
    start_step = restore_training_state(resume_ckpt, compute, optimizer, train_loader) if resume_ckpt else 0
    train_loss = resume_ckpt["train_loss"] if resume_ckpt else None
    val_loss = resume_ckpt["val_loss"] if resume_ckpt else None
    log_path = out_dir / "log.jsonl"
    if compute.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        remove_stale_temp_files(out_dir)  # what a save killed midway left
        if resume_ckpt:
            trim_log(log_path, start_step)

    if objective is None:
        train_objective = language_model_objective(not loss_only_forward(kind, compute.device.type, args.compile))
        val_objective = language_model_objective()
    else:
        train_objective = val_objective = objective
    # compile and wrap only the module that trains; evaluation and checkpoints use the bare `model`
    train_module = torch.compile(model) if args.compile else model
    if compute.ddp:
        train_module = DDP(train_module, device_ids=[compute.local_rank] if compute.device.type == "cuda" else None)
    peak_flops = compute.peak_flops()
    if compute.device.type == "cpu":
        keep_freed_cpu_memory()  # every step frees and allocates the same large tensors again

    def save(step: int) -> Path:
        rngs = compute.gather(rng_state())  # every rank's RNG, for an exact resume
        path = checkpoint_path(out_dir, step)
        if compute.master:
            state = model_state(model) | {
                "kind": kind, "step": step, "train_loss": train_loss, "val_loss": val_loss, "args": vars(args),
                "optimizer": optimizer.state_dict(), "loader": train_loader.state_dict(), "rng": rngs,
            } | (run_state or {})
            save_checkpoint(state, path)
            prune_checkpoints(out_dir, args.keep_last)
        compute.barrier()
        return path

    compute.print0(
        f"{kind}: {model.num_params():,} parameters | {compute.world_size} rank(s) x {grad_accum} micro-step(s) | "
        f"device {compute.device} | {dtype} | steps {start_step} -> {args.max_steps}"
    )
    stop = StopSignal()
    # the step whose state out_dir already holds: a resumed run's start, when resumed from its own directory
    # (rank 0's view, so that every rank agrees on whether a save is due)
    last_saved = compute.gather(start_step if resume_ckpt and checkpoint_path(out_dir, start_step).exists() else None)[0]
    # drawn only on a terminal: in a log file it would be a long run of carriage returns
    bar = tqdm(total=args.max_steps, initial=start_step, desc=kind, unit="step", dynamic_ncols=True,
               disable=not (compute.master and sys.stderr.isatty()))
    try:
        # through max_steps inclusive: the last pass only evaluates and saves
        for step in range(start_step, args.max_steps + 1):
            last = step == args.max_steps
            if stop.requested(compute):
                path = save(step)
                compute.print0(f"stopped by signal {stop.signum} after step {step}: saved {path}; rerun with --resume auto")
                break
            # evaluations never touch the training RNG streams, so turning them on changes no weights
            with torch.random.fork_rng(devices=[compute.device] if compute.device.type == "cuda" else []):
                if last or (args.eval_every > 0 and step % args.eval_every == 0):
                    val = evaluate_loss(model, val_loader, args.val_steps, compute, dtype, val_objective)
                    val_loss = val["val_loss"]
                    compute.print0(f"step {step:6d} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()))
                    if compute.master:
                        append_log(log_path, {"step": step, **val})
                for every, evaluate in evaluations:
                    if last or (every > 0 and step % every == 0):
                        metrics = evaluate(model)
                        # numbers are printed; anything bigger (sample answers) is for the log and prints itself
                        printable = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                        if printable:
                            compute.print0(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in printable.items()))
                        if compute.master:
                            append_log(log_path, {"step": step, **metrics})
            # every --save_every steps and at the end, never the checkpoint a resumed run started from; a
            # fresh --max_steps 0 run ends at once and saves its starting weights (--init_from gpt2 in our format)
            if (step > start_step or resume_ckpt is None) and (
                last or (step > 0 and args.save_every > 0 and step % args.save_every == 0)
            ):
                save(step)
                last_saved = step
            if last:
                break

            t0 = time.time()
            model.train()
            position = train_loader.state_dict()
            try:
                batches, data_error = [train_loader.next_batch() for _ in range(grad_accum)], None
            except DataError as e:  # a shard damaged since the run began
                batches, data_error = [], str(e)
            # [units, target tokens, ranks whose data failed]: one all-reduce tells every rank all three
            counts = torch.tensor([float(sum(train_objective.count(b) for b in batches)),
                                   float(sum((b[1] != IGNORE_INDEX).sum().item() for b in batches)),
                                   float(data_error is not None)], device=compute.device)
            # copy every micro-batch now, while the GPU is idle: a copy from pageable host memory waits for
            # the queued kernels, so copying between micro-steps would leave the GPU idle at each one
            batches = [tuple(t.to(compute.device) for t in b) for b in batches]
            compute.all_reduce(counts)
            if counts[2].item():
                # nothing of this step has run, so with the loader put back the state is that of a save at
                # the step's start: every rank saves it together (keeping the steps done since the last
                # save), then all stop
                train_loader.load_state_dict(position)
                message = next(m for m in compute.gather(data_error) if m)
                if step != last_saved:
                    message += f"\nsaved the steps done so far in {save(step)}: once the shard is whole again, rerun with --resume auto"
                raise DataError(message)
            n_units = counts[0]
            # DDP averages gradients over ranks, so each rank divides by its share of the global count:
            # the result is the mean over every unit of the global batch
            norm = (n_units / compute.world_size).clamp(min=1)
            loss_sum_all = torch.zeros((), device=compute.device)
            figure_sums: dict[str, torch.Tensor] = {}
            for micro, batch in enumerate(batches):
                if compute.ddp:
                    # only the last micro-step all-reduces gradients; the others accumulate locally
                    train_module.require_backward_grad_sync = micro == grad_accum - 1
                with compute.autocast(dtype):
                    loss_sum, figures = train_objective.loss(train_module, batch)
                loss = loss_sum / norm
                loss.backward()
                loss_sum_all += loss.detach()
                for name, value in figures.items():
                    figure_sums[name] = figure_sums.get(name, 0) + value.detach().float()
            compute.all_reduce(loss_sum_all, "mean")
            if figure_sums:  # each figure's mean over the global step's units
                summed = compute.all_reduce(torch.stack(list(figure_sums.values())))
                figures = dict(zip(figure_sums, (summed / n_units.clamp(min=1)).tolist()))
            else:
                figures = {}
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            lr = get_lr(step, args.max_steps, args.max_lr, args.warmup_steps, args.min_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = loss_sum_all.item()  # a sync point: the step's time below is real
            dt = time.time() - t0
            tokens = int(counts[1].item())
            record = {"step": step + 1, "train_loss": train_loss, **figures, "lr": lr, "grad_norm": grad_norm.item(),
                      "dt_ms": 1000 * dt, "tokens_per_s": tokens / dt}
            line = (f"step {step + 1:6d}/{args.max_steps} | loss {train_loss:.6f} | "
                    + "".join(f"{k.replace('_', ' ')} {v:.4f} | " for k, v in figures.items())
                    + f"lr {lr:.4e} | norm {record['grad_norm']:.4f} | {record['dt_ms']:.0f} ms | "
                    f"{record['tokens_per_s']:,.0f} tok/s")
            if peak_flops:
                record["mfu"] = model.flops_per_token(batches[-1][0].size(1)) * tokens / dt / (peak_flops * compute.world_size)
                line += f" | mfu {100 * record['mfu']:.1f}%"
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                compute.print0(line)
            bar.update(1)
            if compute.master:
                append_log(log_path, record)
    finally:
        bar.close()
        stop.restore()
    write_run_report(out_dir, compute)


def write_run_report(out_dir: Path, compute: Compute) -> None:
    """report.md and plots of the run so far (eval/report.py), on rank 0. A failure to draw them is
    reported but never fails the training run, whose checkpoints are what matters."""
    if not compute.master:
        return
    try:
        compute.print0(f"report: {write_report(out_dir)}")
    except Exception as e:  # noqa: BLE001 - any plotting failure; the run itself succeeded
        compute.print0(f"warning: could not write the run report ({type(e).__name__}: {e}); "
                       f"python eval/report.py --run {out_dir} retries")
