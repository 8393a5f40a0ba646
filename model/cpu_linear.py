"""Linear layers on CPU through oneDNN instead of torch's default BLAS (MKL).

Why: on AMD CPUs MKL takes its generic code path (MKL_VERBOSE says so on the 2-core AMD EPYC this
repo is developed on) and reaches about half of what oneDNN, which picks its kernels from the CPU's
features whoever made it, does with the same fp32 numbers. Measured there at the GPT-2 124M shape
with 1024 rows: each forward, input-gradient and weight-gradient product about 2x faster; a whole
124M training step 1.7x; a decode step of one row about 4x with packed weights. Results are fp32
(relative error 1e-6 against float64, as MKL's). On an Intel Xeon, where MKL takes its tuned path,
MKL was as fast or faster product by product (README, Benchmarks): the gain is AMD's.

These are torch's private oneDNN ops, and what they accept depends on the CPU: on a plain AVX2 CPU
(or with ONEDNN_MAX_CPU_ISA=AVX2) oneDNN has no bf16 kernel at all and the op raises. So each path
is taken only after oneDNN has run it once here (runs(), a tiny product asked once per process and
dtype); everywhere else model/gpt.py and model/lm_loss.py keep torch's own F.linear and
cross-entropy.

model/gpt.py's Linear calls linear() for float32 on CPU where runs(); everything else keeps F.linear.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile

import torch
import torch.nn.functional as F


def _eager_cpu(x: torch.Tensor) -> bool:
    # not under torch.compile, which chooses its own kernels (runs() answers for a torch without oneDNN)
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


@functools.cache
def runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs on this CPU in dtype, with a dense and with a packed weight, and
    gives F.linear's result: asked once per process and dtype with a 3 x 8 x 16 product.

    Not decided from CPU flags: what oneDNN accepts also depends on its build and on
    ONEDNN_MAX_CPU_ISA (bf16 needs AVX512BW/AVX-NE-CONVERT or better; ARM builds differ again).
    The inputs are made without the global RNG, so asking never changes a seeded run."""
    if not torch.backends.mkldnn.is_available():
        return False
    # on the CPU whatever the default device (a meta or CUDA default would otherwise cache a False)
    x = (torch.arange(24, dtype=torch.float32, device="cpu").view(3, 8) / 8 - 1).to(dtype)
    w = (torch.arange(128, dtype=torch.float32, device="cpu").view(16, 8) / 64 - 1).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        expected = F.linear(x.float(), w.float())
        try:
            dense, packed = product(x, w), product(x, pack(w))
        except RuntimeError:  # "could not create a primitive descriptor ...": no kernel for dtype here
            return False
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bf16 holds 8 bits of mantissa
    return all(torch.allclose(y.float(), expected, rtol=tolerance, atol=tolerance) for y in (dense, packed))


def usable(x: torch.Tensor) -> bool:
    """Whether x can go through oneDNN here: float32 on CPU, no autocast (which would want bf16
    products), not under torch.compile (which chooses its own kernels), and a oneDNN that runs it."""
    return (_eager_cpu(x) and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and runs(torch.float32))


def bf16_autocast(x: torch.Tensor) -> bool:
    """Whether x is on CPU under bf16 autocast, outside torch.compile."""
    return _eager_cpu(x) and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def usable_bf16(x: torch.Tensor) -> bool:
    """Whether x is under CPU bf16 autocast, outside torch.compile, with a oneDNN that multiplies
    bf16 here."""
    return bf16_autocast(x) and runs(torch.bfloat16)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and oneDNN does so here.
    On an AMD EPYC Zen 4 oneDNN's bf16 products ran 2-2.7x its float32 ones, but on an Intel Xeon
    with AVX512-BF16 and no AMX the demo trained slower in bf16 than in float32 (README); elsewhere
    bf16 is emulated or left to torch's generic kernels, slower than float32."""
    on_x86 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return on_x86 and runs(torch.bfloat16)


@functools.cache
def onednn_isa() -> str | None:
    """The instruction set oneDNN dispatches to here, as its verbose mode names it ("Intel AVX2",
    "Intel AVX-512 with ..."): after ONEDNN_MAX_CPU_ISA, so what its kernels really use. None
    without oneDNN. Captures oneDNN's verbose lines, which it prints to file descriptor 1, so call
    it before other threads write there (the benchmarks call it first)."""
    if not torch.backends.mkldnn.is_available():
        return None
    if os.environ.get("ONEDNN_VERBOSE") or os.environ.get("DNNL_VERBOSE"):
        # oneDNN has printed (or will print) its header where the user asked: not ours to capture
        return f"not read (ONEDNN_VERBOSE is set; cap: {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')})"
    x = torch.ones(2, 8, device="cpu")
    with tempfile.TemporaryFile() as captured, torch.no_grad():
        sys.stdout.flush()  # what Python holds goes out before fd 1 is borrowed
        stdout = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                product(x, x)
        finally:
            os.dup2(stdout, 1)
            os.close(stdout)
        captured.seek(0)
        match = re.search(r"info,cpu,isa:([^\n]+)", captured.read().decode(errors="replace"))
    return match.group(1).strip() if match else "unknown"


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
