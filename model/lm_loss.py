"""The language-model loss from hidden states: lm_head and cross-entropy as one step, fused on CPU.

Why: the logits of a training batch are large (1024 rows of a 50k vocabulary: 206 MB of float32),
and F.cross_entropy's backward pass writes three more tensors of that size (the log-softmax, the
loss's gradient zero-filled then scattered, the log-softmax's gradient). On CPU each fresh tensor of
that size costs about 40 ms of page faults on top of its arithmetic: measured on the 2-core dev box,
cross-entropy was 40% of a 6-layer, 128-wide training step. The fused version writes the logits
once and does everything else in place: the log-softmax over the logits, then its gradient (softmax
minus one-hot) over the log-softmax; the loss's scale (1/rows for a mean, the upstream gradient)
goes onto the small (rows, n_embd) products instead of the logits.

model/gpt.py calls lm_loss() when only the loss is wanted; float32 on CPU without torch.compile
takes the fused path (cpu_linear.usable), everything else F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import cpu_linear


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ weight.T, targets), summed or averaged, with every target valid."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mean: bool) -> torch.Tensor:
        logp = cpu_linear.product(h, weight)  # (rows, vocab) logits
        # in place: row by row the kernel reads the logits before it writes (checked bitwise in the tests)
        torch.ops.aten._log_softmax.out(logp, -1, False, out=logp)
        loss = -logp.gather(1, targets[:, None]).sum()
        scale = 1.0 / len(targets) if mean else 1.0
        ctx.save_for_backward(h, weight, logp, targets)
        ctx.scale = scale
        return loss * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, logp, targets = ctx.saved_tensors
        dlogits = logp.exp_()  # softmax, in place: the log-softmax was kept for this alone
        dlogits.scatter_add_(1, targets[:, None], torch.full((len(targets), 1), -1.0, dtype=dlogits.dtype))
        scale = grad * ctx.scale
        grad_h = cpu_linear.input_grad(dlogits, weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = cpu_linear.weight_grad(dlogits, h * scale) if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, None, None


def lm_loss(h: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of lm_head(h) (rows, vocab) against targets (rows,), all of them valid (the
    caller drops ignored positions): "mean" or "sum" over the rows, in float32."""
    if len(targets) and cpu_linear.usable(h) and lm_head.weight.dtype == torch.float32 and lm_head.bias is None:
        return _LinearCrossEntropy.apply(h, lm_head.weight, targets, reduction == "mean")
    return F.cross_entropy(lm_head(h).float(), targets, reduction=reduction)
