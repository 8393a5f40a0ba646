"""Linear layers on CPU through oneDNN instead of torch's default BLAS (MKL).

Why: on AMD CPUs MKL takes its generic code path (MKL_VERBOSE says so on the 2-core AMD EPYC this
repo is developed on) and reaches about half of what oneDNN, which picks its kernels from the CPU's
features whoever made it, does with the same fp32 numbers. Measured there at the GPT-2 124M shape
with 1024 rows: each forward, input-gradient and weight-gradient product about 2x faster; a whole
124M training step 1.7x; a decode step of one row about 4x with packed weights. On Intel CPUs MKL
takes its tuned path, so the gain there should be smaller (not measured: no Intel machine here).
Results are fp32 (relative error 1e-6 against float64, as MKL's).

model/gpt.py's Linear calls linear() for float32 on CPU; everything else keeps F.linear.
"""

from __future__ import annotations

import torch


def _eager_onednn_cpu(x: torch.Tensor) -> bool:
    # not under torch.compile, which chooses its own kernels; and a torch built with oneDNN
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available()


def usable(x: torch.Tensor) -> bool:
    """Whether x can go through oneDNN here: float32 on CPU, no autocast (which would want bf16
    products), not under torch.compile (which chooses its own kernels), and a torch built with it."""
    return _eager_onednn_cpu(x) and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). There, oneDNN's bf16
    products run 2-2.7x its float32 ones (measured on the AMD EPYC dev box); elsewhere bf16 is
    emulated and slower than float32."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def usable_bf16(x: torch.Tensor) -> bool:
    """Whether x is under CPU bf16 autocast, outside torch.compile, with oneDNN to multiply in bf16."""
    return _eager_onednn_cpu(x) and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in oneDNN; weight is (out, in) dense, or packed by pack()."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight in oneDNN's packed layout, for repeated inference with it (about 2x a dense weight at
    decode shapes). The batch-size hint shapes the layout: any value from 2 up measured alike, 1 was
    2x slower."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad (rows, out) @ weight (out, in): the input's gradient of x @ weight.T, in oneDNN."""
    return product(grad, weight.t().contiguous())


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad.T (out, rows) @ x (rows, in): the weight's gradient of x @ weight.T.

    oneDNN is 1.3-1.8x faster than MKL here, except for a weight far wider than its input: the
    vocabulary projection of a narrow model, (50304, 128), measured 2x slower, so it stays on mm."""
    out_features, in_features = grad.size(1), x.size(1)
    if in_features >= 512 or out_features <= 4 * in_features:
        return product(grad.t(), x.t().contiguous())
    return grad.t().mm(x)


class _Linear(torch.autograd.Function):
    """F.linear with oneDNN products in the forward and the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.size(-1))  # (rows, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad2, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(grad2, x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN; for usable() inputs only. packed, a pack() of
    weight, is used when no gradient is wanted."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return product(x, weight if packed is None else packed, bias)
