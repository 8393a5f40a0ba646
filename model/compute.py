"""Where the work runs: device choice, torchrun's process group, seeds and precision switches.

One setup function and one cleanup, shared by training and evaluation scripts. Under torchrun
(RANK, LOCAL_RANK and WORLD_SIZE set) it joins the process group: nccl on CUDA, gloo on CPU, so
multi-process runs, and their tests, work without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import cpu_linear

# Dense bf16 peak FLOP/s for MFU: (words of the GPU's name, peak), the first entry whose words are all
# in the name wins. Unknown GPUs, and MIG slices of known ones, report no MFU rather than a wrong one.
BF16_PEAK_FLOPS = [
    (("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H200", "NVL"), 835e12), (("H100",), 989e12),
    (("H200",), 989e12), (("GH200",), 989e12), (("A100",), 312e12), (("L40S",), 362e12), (("L40",), 181e12),
    (("L4",), 121e12), (("A10G",), 70e12), (("A10",), 125e12),
]


def bf16_peak_flops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name names it, or None if unknown."""
    words = set(re.split(r"[^A-Z0-9]+", gpu_name.upper()))
    if "MIG" in words:  # a slice of the card: its share of the peak is not in the name
        return None
    return next((peak for keys, peak in BF16_PEAK_FLOPS if all(k.upper() in words for k in keys)), None)


@dataclass
class Compute:
    device: torch.device
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self) -> bool:
        """Rank 0 logs, writes checkpoints and prints."""
        return self.rank == 0

    def print0(self, *args, **kwargs) -> None:
        if self.master:
            with tqdm.external_write_mode():  # a progress bar, if one is drawn, moves below the line
                print(*args, **kwargs, flush=True)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor across ranks in place ("sum", "mean" or "max"); a no-op in one process."""
        if self.ddp:
            # gloo has no AVG, so mean is a sum divided here
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def gather(self, obj: object) -> list:
        """The object of every rank, in rank order (a one-element list in one process)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def autocast(self, dtype: str):
        """bf16 autocast for the forward pass where asked for; float32 runs as is."""
        if dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def peak_flops(self) -> float | None:
        """The GPU's dense bf16 peak, or None where it is not known."""
        if self.device.type != "cuda":
            return None
        return bf16_peak_flops(torch.cuda.get_device_name(self.device))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo on Linux, with x86's family and model numbers or ARM's
    implementer and part (VMs often give only a generic name); the platform's word elsewhere."""
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.machine()
    if "cpu family" in info and "model" in info:
        return f"{name} (family {info['cpu family']} model {info['model']})"
    if "CPU implementer" in info and "CPU part" in info:
        return f"{name} (implementer {info['CPU implementer']} part {info['CPU part']})"
    return name


def describe_cpu() -> str:
    """One line naming this CPU and the instruction sets torch's CPU kernels take on it: ATen's
    vectorised ops, oneDNN's products (both after ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA caps),
    and whether bf16 is native. Benchmarks print it: a figure means little without it."""
    return (f"CPU: {cpu_name()}, {os.cpu_count()} cores | ATen: {torch.backends.cpu.get_cpu_capability()} | "
            f"oneDNN: {cpu_linear.onednn_isa() or 'absent'} | bf16: {'native' if cpu_linear.native_bf16() else 'emulated'}")


def check_device(device: str) -> None:
    """Refuse a device name this machine cannot run on (ValueError saying what to pass instead)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device: pass auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine (or this torch build) has no CUDA GPU: pass --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here: pass --device cpu or auto")


def pick_device(device: str) -> str:
    """"auto" becomes cuda, then mps, then cpu, whichever is there first."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_compute(device: str = "auto", seed: int = 1337) -> Compute:
    """Join torchrun's process group if there is one, pick the device, seed torch, enable TF32."""
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(pick_device(device))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if ddp else dev.index or 0)
        torch.cuda.set_device(dev)  # the current device is per process and per thread: set it before any CUDA work
        # TF32 for float32 matmuls: bf16 autocast is unaffected, the float32 parts get much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return Compute(device=dev, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size)


# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> bool:
    """Have glibc keep the memory that tensors free, for the next tensors of the same sizes.

    Why: by default glibc serves every allocation over 32 MB with a fresh mmap and returns it to the
    kernel when freed, and it hands the top of its heap back once 128 KB-64 MB of it are free. A CPU
    training step allocates and frees the same large tensors every time (a 124M model's logits are
    412 MB at 8 x 256 tokens, its activations over a GB), so each step page-faulted all of them in
    again, zero-filled by the kernel: measured on the 2-core dev box, a float32 GPT-2 124M step took
    12.7 s against 10.4 s with this, the demo's 6 x 128 model 572 ms against 480 (360-388 against
    307-314 in bf16). The cost is that the process keeps its peak memory (a training process soon
    returns to it anyway), and a little more held apart by fragmentation before it settles: 4.7 GB
    resident against 4.3 GB in that 124M run, 1.1-1.3 GB against 0.6-0.8 for the demo's model.

    Process-wide, so the training loop calls it for CPU runs only; servers and the GPU path keep
    glibc's defaults. Returns False, changing nothing, off glibc (macOS, musl).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt takes an int: the largest one serves allocations up to 2 GB from the heap; -1 never trims it
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def cleanup(compute: Compute) -> None:
    """Leave the process group (torchrun warns about, and sometimes hangs on, groups left open)."""
    if compute.ddp and dist.is_initialized():
        dist.destroy_process_group()
