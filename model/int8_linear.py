"""Weight-only int8 linear layers, for decoding on CPU (GPT.prepare_inference(quant="int8")).

Why: a decode step multiplies a few rows by every weight, so on a CPU its speed is set by the bytes
of weights it reads; int8 reads a quarter of float32's. Each Linear's weight (out, in) becomes int8
values and one float scale per output channel (symmetric: scale = max |w| / 127 over the channel),
and the product dequantizes inside the kernel: torch's own _weight_int8pack_mm, which reads the
int8 values and multiplies them with bfloat16 activations, accumulating in float32. Measured at
the GPT-2 124M shapes with one row on a 2-core Intel Xeon (family 6 model 167), natively and with
ATen capped to AVX2: about 3x faster than float32 (README, Benchmarks).

That kernel computes each row on its own, so its cost grows with the rows as a float32 GEMM's does
not: above KERNEL_ROWS rows (a prompt's prefill, a held-out loss) the weight is dequantized to
float32 once and multiplied as usual, which is faster there. Both paths compute with the same int8
weights, so a quality figure measured on long texts is the decoder's.

Activations enter the kernel as bfloat16 (its fast path; float32 inputs take a scalar loop 3-10x
slower) and the output is bfloat16, converted back: about 0.4% relative rounding per value,
against int8's ~1% of a channel. The scales are rounded up to bfloat16 values before quantizing, so
the kernel's bfloat16 scales are exact. Where the kernel does not run (a torch built without it),
every product takes the dequantizing path: the same int8 numbers, slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import cpu_linear

# Rows up to which the int8 kernel beats dequantizing + one float32 product. Measured on the 2-core
# Intel Xeon at 3072 x 768 (natively, and with ATen and oneDNN capped to AVX2): 16 rows 0.47 ms
# against 0.38 + 0.33 ms, 64 rows 1.8 ms against 0.38 + 0.82 ms. Up to 32, a decode step of a full
# batch (the server's 16 rows, exact match's 32) stays on the kernel, so each row gets the same
# bits whatever its neighbours (the kernel is row by row).
KERNEL_ROWS = 32


@dataclass
class Int8Weight:
    """A Linear weight (out, in) as int8 values and a per-output-channel scale: w ~ values * scale[:, None]."""

    values: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) float32, each exactly a bfloat16 value
    scale_bf16: torch.Tensor  # the same scales as the kernel takes them

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these values stand for, (out, in) in dtype."""
        return torch.empty(self.values.shape, dtype=dtype, device=self.values.device).copy_(self.values).mul_(
            self.scale.to(dtype)[:, None])

    def nbytes(self) -> int:
        """Bytes a product reads: the values and the kernel's scales."""
        return self.values.numel() + self.scale_bf16.numel() * self.scale_bf16.element_size()


def round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= x (positive, finite float32), as float32: the low 16 bits of
    the float32 pattern carried up into the 16 that bfloat16 keeps."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


@torch.no_grad()
def quantize(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of a float weight (out, in): every value in -127..127."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    # an all-zero channel gets scale 1 (its values are 0 whatever the scale); others reach 127 at most
    scale = round_up_to_bf16(torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)))
    values = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(values=values, scale=scale, scale_bf16=scale.to(torch.bfloat16))


def _kernel(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x (rows, in) @ dequantized weight.T through torch's int8 kernel, in x's dtype."""
    product = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), weight.values, weight.scale_bf16)
    return product.to(x.dtype)


@functools.cache
def kernel_runs() -> bool:
    """Whether torch's int8 kernel runs on this CPU and gives the dequantized product: asked once
    per process with a 3 x 64 x 16 product (inputs made without the global RNG)."""
    x = torch.arange(192, dtype=torch.float32).view(3, 64) / 96 - 1
    weight = quantize(torch.arange(1024, dtype=torch.float32).view(16, 64).sin())
    expected = x.to(torch.bfloat16).float() @ weight.dequantize().T
    try:
        with torch.no_grad():
            got = _kernel(x, weight)
    except (RuntimeError, NotImplementedError):  # a build or platform without it
        return False
    return torch.allclose(got, expected, rtol=2e-2, atol=2e-2)  # the output is bfloat16


def linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with an int8 weight, for inference (no gradients); x (..., in)."""
    rows = x.reshape(-1, x.size(-1))
    if rows.size(0) <= KERNEL_ROWS and x.device.type == "cpu" and kernel_runs():
        y = _kernel(rows, weight)
        if bias is not None:
            y += bias
    else:
        dense = weight.dequantize(x.dtype)
        y = cpu_linear.product(rows, dense, bias) if cpu_linear.usable(rows) else F.linear(rows, dense, bias)
    return y.view(*x.shape[:-1], y.size(-1))
