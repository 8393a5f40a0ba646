"""Weight-only int8 linear layers, for decoding on CPU (GPT.prepare_inference(quant="int8")).

Why: a decode step multiplies a few rows by every weight, so on a CPU its speed is set by the bytes
of weights it reads; int8 reads a quarter of float32's. Each Linear's weight (out, in) becomes int8
values and one float scale per output channel (symmetric: scale = max |w| / 127 over the channel),
and the product dequantizes inside the kernel: torch's own _weight_int8pack_mm, which reads the
int8 values and multiplies them with bfloat16 activations, accumulating in float32. Measured on a
2-core Intel Xeon (family 6 model 167) at the GPT-2 124M shape, natively and with ATen and oneDNN
capped to AVX2: batch-1 decoding 2.15x and 2.24x our float32 engine's speed (README, Benchmarks).

That kernel computes each row on its own, so its cost grows with the rows as a float32 GEMM's does
not: above KERNEL_ROWS rows (a prompt's prefill, a held-out loss) the weight is dequantized to
float32 once and multiplied as usual, which is faster there. Both paths compute with the same int8
weights (the dequantizing one without the kernel's bfloat16 rounding of activations), so a quality
figure measured on long texts is the int8 weights'.

Activations enter the kernel as bfloat16 (its fast path; float32 inputs take a scalar loop 3-10x
slower) and the output is bfloat16, converted back: about 0.4% relative rounding per value,
against int8's ~1% of a channel. The scales are rounded up to bfloat16 values before quantizing, so
the kernel's bfloat16 scales are exact. Where the kernel does not run (a torch built without it),
or cannot (an input width that is not a multiple of 16), products take the dequantizing path: the
same int8 numbers, slower.

Streaming the weights from memory, the kernel is bound by latency (it prefetches one cache line
ahead on rows of 768 bytes): measured at 11 GB/s against float32 products' 22-25 on the same
machine. Backing the int8 values with 2 MB pages (gather_in_huge_pages) spares most TLB misses and
took it to 15 GB/s.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model import cpu_linear

# Rows up to which the int8 kernel beats dequantizing + one float32 product. Measured on the 2-core
# Intel Xeon at 3072 x 768 (natively, and with ATen and oneDNN capped to AVX2): 16 rows 0.47 ms
# against 0.38 + 0.33 ms, 64 rows 1.8 ms against 0.38 + 0.82 ms. Up to 32, a decode step of a full
# batch (the server's 16 rows, exact match's 32) stays on the kernel, so each row gets the same
# bits whatever its neighbours (the kernel is row by row); the server refuses more rows with int8.
KERNEL_ROWS = 32
# The kernel reads each row 16 values at a time and has no tail: at other widths it reads past the
# row (measured: wrong sums at 40, a crash at 100), so those take the dequantizing path.
KERNEL_WIDTH_MULTIPLE = 16
MADV_HUGEPAGE, HUGE_PAGE, CACHE_LINE = 14, 2 << 20, 64  # Linux's madvise advice; x86-64's page and line sizes
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"  # "[never]" there: madvise succeeds, to no effect


@dataclass
class Int8Weight:
    """A Linear weight (out, in) as int8 values and a per-output-channel scale: w ~ values * scale[:, None]."""

    values: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) bfloat16, as the kernel takes them (exact in float32 too)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these values stand for, (out, in) in dtype."""
        return torch.empty(self.values.shape, dtype=dtype, device=self.values.device).copy_(self.values).mul_(
            self.scale.to(dtype)[:, None])

    def nbytes(self) -> int:
        """Bytes a product reads: the values and the scales."""
        return self.values.numel() + self.scale.numel() * self.scale.element_size()


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
    return Int8Weight(values=values, scale=scale.to(torch.bfloat16))


def gather_in_huge_pages(weights: list[Int8Weight]) -> bool:
    """Move the int8 values of weights into one buffer that Linux backs with 2 MB pages (transparent
    huge pages, asked for with madvise), each on a cache-line boundary. Returns False, changing
    nothing, off Linux, where THP is off ("never") or where the kernel refuses the advice."""
    if platform.system() != "Linux" or not weights:
        return False
    try:
        if "[never]" in Path(THP_SETTING).read_text():
            return False
    except OSError:  # no THP in this kernel
        return False
    offsets, total = [], 0
    for w in weights:
        offsets.append(total)
        total += -(-w.values.numel() // CACHE_LINE) * CACHE_LINE
    buffer = torch.empty(total + HUGE_PAGE, dtype=torch.int8)
    start = -buffer.data_ptr() % HUGE_PAGE  # the first 2 MB boundary in it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(buffer.data_ptr() + start, total, MADV_HUGEPAGE) != 0:
        return False
    for w, offset in zip(weights, offsets):
        view = buffer[start + offset : start + offset + w.values.numel()].view(w.values.shape)
        w.values = view.copy_(w.values)
    return True


def _kernel(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x (rows, in) @ dequantized weight.T through torch's int8 kernel, in x's dtype."""
    # a fresh bf16 copy: the kernel loads its rows with aligned loads, which a view at an offset may break
    a = x.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
    return torch.ops.aten._weight_int8pack_mm(a, weight.values, weight.scale).to(x.dtype)


@functools.cache
def kernel_runs() -> bool:
    """Whether torch's int8 kernel runs on this CPU and gives the dequantized product: asked once
    per process with a 3 x 64 x 16 product (inputs made without the global RNG, on the CPU whatever
    the default device)."""
    x = torch.arange(192, dtype=torch.float32, device="cpu").view(3, 64) / 96 - 1
    weight = quantize(torch.arange(1024, dtype=torch.float32, device="cpu").view(16, 64).sin())
    expected = x.to(torch.bfloat16).float() @ weight.dequantize().T
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            got = _kernel(x, weight)
    except (RuntimeError, NotImplementedError):  # a build or platform without it
        return False
    return torch.allclose(got, expected, rtol=2e-2, atol=2e-2)  # the output is bfloat16


def kernel_description() -> str:
    """How int8 products run here, for logs: on torch's kernel, or dequantized where it does not run."""
    return "torch's int8 kernel" if kernel_runs() else "no int8 kernel in this torch: dequantized per product"


def linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with an int8 weight, for inference (no gradients); x (..., in)."""
    rows = x.reshape(-1, x.size(-1))
    if (rows.size(0) <= KERNEL_ROWS and rows.size(1) % KERNEL_WIDTH_MULTIPLE == 0 and x.device.type == "cpu"
            and kernel_runs()):
        y = _kernel(rows, weight)
        if bias is not None:
            y += bias
    else:
        dense = weight.dequantize(x.dtype)
        y = cpu_linear.product(rows, dense, bias) if cpu_linear.usable(rows) else F.linear(rows, dense, bias)
    return y.view(*x.shape[:-1], y.size(-1))
