"""Weights to start from or to evaluate: a checkpoint of any stage of this repo, or Hugging Face GPT-2.

Fine-tuning (--pretrained_checkpoint / --init_from) and eval/hellaswag.py (--checkpoint / --init_from)
load through here: a step_*.pt file or a run directory (its newest checkpoint), or gpt2, ..., or a
local HF directory.
"""

from __future__ import annotations

from dataclasses import replace

from model.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from model.export_hf import load_hf_model
from model.gpt import GPT


def load_pretrained(checkpoint: str | None = None, init_from: str | None = None) -> tuple[GPT, str]:
    """The model of a checkpoint (file or run directory) or of HF GPT-2 weights, and where it came from.

    Exactly one of the two must be given; a missing file raises FileNotFoundError naming the scripts
    that write checkpoints.
    """
    if (checkpoint is None) == (init_from is None):
        raise ValueError("pass exactly one of a checkpoint (e.g. checkpoints/pretrain) and --init_from (e.g. gpt2)")
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        return model_from_checkpoint(load_checkpoint(path)), str(path)
    return load_hf_model(init_from), init_from


def with_dropout(model: GPT, dropout: float) -> GPT:
    """The same weights in a GPT whose dropout is this run's choice: the modules fix it at construction,
    and a pretrained config's own (OpenAI's GPT-2 says 0.1) is no choice of the run's."""
    tuned = GPT(replace(model.config, dropout=dropout))
    tuned.load_state_dict(model.state_dict())
    return tuned
