"""Checkpoints: one format for every stage, written atomically, found and loaded safely.

`checkpoints/<run>/step_NNNNNN.pt` (NNNNNN = optimizer steps completed) holds a dict of plain data:

    model       state dict of the bare GPT: no "module." (DDP) or "_orig_mod." (compile) prefixes
    config      the GPTConfig as a plain dict, so GPT(GPTConfig(**ck["config"])) rebuilds the model
    step        optimizer steps completed
    kind        which script wrote it: "pretrain", "sft" or "dpo"
    train_loss  last training loss (float or None)
    val_loss    last validation loss (float or None)
    args        the flags of the run (a plain dict)
  and, for an exact resume:
    optimizer   optimizer.state_dict()
    loader      the training loader's position (a plain dict)
    rng         one dict per rank of every RNG state (torch, cuda, numpy, python)
    reference_logps  (dpo) the frozen reference's log-probs of every pair: {"train", "val"} tensors

Everything loads with torch.load(weights_only=True): a checkpoint is data, never code. Writes go to
a temporary file that is fsynced and then renamed, so a reader never sees a half-written step_*.pt.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_write
from model.gpt import GPT, GPTConfig

_CKPT_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps lives."""
    return Path(run_dir) / f"step_{step:06d}.pt"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write state to path atomically (model/atomic.py): readers never see half a checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint file's name records, or None for a name that is no checkpoint's."""
    m = _CKPT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step_*.pt files of a run, oldest first (temp files of interrupted saves never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def is_complete(path: str | Path) -> bool:
    """torch.save writes a zip archive whose directory comes last: a truncated file has none."""
    return zipfile.is_zipfile(path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
        print(f"skipping {path}: it is incomplete (a save was interrupted)")
    return None


PRODUCERS = "model/train_gpt2.py or model/finetune_dolly.py"  # the scripts that write checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest one of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path}: run {PRODUCERS} first")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a step_*.pt file or a run directory, or run {PRODUCERS} first")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint as plain data (weights_only=True), with errors that say what is wrong."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path} is truncated or not a checkpoint: delete it and use an earlier one")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than plain data and cannot be loaded safely: {e}") from None
    except RuntimeError as e:  # a zip archive that is not a torch.save file, or one damaged inside
        raise ValueError(f"{path} is damaged or not a checkpoint ({e}): delete it and use an earlier one") from None
    missing = {"model", "config", "step"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this repo (missing {sorted(missing)})")
    return ckpt


def checkpoint_kind(path: str | Path) -> str | None:
    """The stage that wrote a checkpoint ("pretrain", "sft" or "dpo"; None if it does not say or cannot be
    read), without reading its tensors: they are memory-mapped, not loaded."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None
    return ckpt.get("kind") if isinstance(ckpt, dict) else None


def model_from_checkpoint(ckpt: dict) -> GPT:
    """Rebuild the GPT of a loaded checkpoint, weights loaded strictly."""
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, RuntimeError) as e:  # a config of other fields, or weights that do not fit it
        raise ValueError(f"the checkpoint's weights do not match its config ({e}): it was not written by this repo") from None
    return model


def model_state(model: GPT) -> dict:
    """The pieces of a checkpoint that describe the model itself."""
    return {"model": model.state_dict(), "config": asdict(model.config)}


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints of a run (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Every RNG state of this process, in forms torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # a numpy array would be refused
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": np_state,
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.array(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    random.setstate(state["python"])
