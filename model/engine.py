"""Text generation on the one GPT module, shared by every stage that lets a model answer."""

from __future__ import annotations

import torch

from model.gpt import GPT
from model.tokenizer import EOT


@torch.inference_mode()
def generate_greedy(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of prompt: up to max_new_tokens tokens, ending before <|endoftext|>.

    Each step runs the model over the last block_size tokens (no cache: this is for a few sample
    answers during training, where simplicity beats speed). The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(tokens[:, -model.config.block_size :])
        token = int(logits[0, -1, :EOT + 1].argmax())  # the padded vocabulary's extra rows are never tokens
        if token == EOT:
            break
        out.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
    model.train(was_training)
    return out
