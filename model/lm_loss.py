"""The language-model loss from hidden states: lm_head and cross-entropy as one step, fused on CPU.

Why: the logits of a training batch are large (1024 rows of a 50k vocabulary: 206 MB of float32),
and F.cross_entropy's backward pass writes three more tensors of that size (the log-softmax, the
loss's gradient zero-filled then scattered, the log-softmax's gradient). On CPU each fresh tensor of
that size costs about 40 ms of page faults on top of its arithmetic: measured on the 2-core dev box,
cross-entropy was 40% of a 6-layer, 128-wide training step. The fused version writes the logits
once and does everything else in place: the log-softmax over the logits, then its gradient (softmax
minus one-hot) over the log-softmax; the loss's scale (1/rows for a mean, the upstream gradient)
goes onto the small (rows, n_embd) products instead of the logits.

Under CPU bf16 autocast the products run in bf16 (2-2.7x float32's speed on a CPU with native
bf16, cpu_linear.native_bf16) and the logits are bf16: the log-softmax and its gradient are computed
in float32 a few rows at a time, and the gradient goes back over the bf16 logits, in the precision
autocast's own backward pass would give the products. Only that bf16 tensor is kept for the backward
pass. The float32 rows are 16 MB at most, below glibc's 32 MB mmap threshold, so their memory is
reused from the heap instead of page-faulted in afresh (about 90 ms per 200 MB on the dev box).
A forward pass that needs no gradient (validation) computes the loss alone.

model/gpt.py calls lm_loss() when only the loss is wanted; float32 on CPU without torch.compile
takes the fused path (cpu_linear.usable), as does CPU bf16 autocast (cpu_linear.usable_bf16);
everything else F.cross_entropy.
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


CHUNK_BYTES = 16 << 20  # float32 rows of the bf16 path at a time; see the module docstring


class _LinearCrossEntropyBF16(torch.autograd.Function):
    """cross_entropy(h @ weight.T, targets) with bf16 products and a float32 log-softmax."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mean: bool) -> torch.Tensor:
        h, weight = h.to(torch.bfloat16), weight.to(torch.bfloat16)
        logits = cpu_linear.product(h, weight)  # (rows, vocab) bf16
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows_at_once = max(1, CHUNK_BYTES // (4 * logits.size(1)))
        loss = torch.zeros((), dtype=torch.float32)
        for i in range(0, len(targets), rows_at_once):
            part, t = logits[i : i + rows_at_once].float(), targets[i : i + rows_at_once, None]
            torch.ops.aten._log_softmax.out(part, -1, False, out=part)
            loss -= part.gather(1, t).sum()
            if want_grad:  # the logits' gradient (softmax minus one-hot) replaces them
                part.exp_().scatter_add_(1, t, torch.full(t.shape, -1.0))
                logits[i : i + rows_at_once] = part
        ctx.scale = 1.0 / len(targets) if mean else 1.0
        if want_grad:
            ctx.save_for_backward(h, weight, logits)
        return loss * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, dlogits = ctx.saved_tensors
        scale = grad * ctx.scale
        grad_h = (dlogits @ weight).float().mul_(scale) if ctx.needs_input_grad[0] else None
        grad_weight = (dlogits.t() @ h).float().mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, None, None


def lm_loss(h: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of lm_head(h) (rows, vocab) against targets (rows,), all of them valid (the
    caller drops ignored positions): "mean" or "sum" over the rows, in float32."""
    # (an int8 lm_head, model/int8_linear.py, has no float weight to fuse: it takes the plain path)
    if len(targets) and lm_head.weight is not None and lm_head.weight.dtype == torch.float32 and lm_head.bias is None:
        if cpu_linear.usable(h):
            return _LinearCrossEntropy.apply(h, lm_head.weight, targets, reduction == "mean")
        if cpu_linear.usable_bf16(h):
            return _LinearCrossEntropyBF16.apply(h, lm_head.weight, targets, reduction == "mean")
    return F.cross_entropy(lm_head(h).float(), targets, reduction=reduction)
