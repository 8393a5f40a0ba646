"""model/cpu_linear.py: oneDNN products equal F.linear's, forward and backward, on every path."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
# the fast path's own tests; where oneDNN runs no float32 product here, the plain path is what runs
# (tests/test_gpt.py and test_lm_loss.py check it with the without_onednn fixture)
needs_float32 = pytest.mark.skipif(not cpu_linear.runs(torch.float32), reason="oneDNN runs no float32 product here")


@needs_float32
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (16, 400)])  # the two weight-gradient paths
@pytest.mark.parametrize("shape", [(5,), (3, 7)])  # rows as (N,) and as (B, T)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_its_gradients_equal_f_linear(in_features, out_features, shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(*shape, in_features, requires_grad=True)
    # non-contiguous, as autograd may pass it
    grad = torch.randn(*shape, out_features).transpose(0, -1).contiguous().transpose(0, -1)
    assert cpu_linear.usable(x)

    def run(fn):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = fn(x, layer.weight, layer.bias)
        y.backward(grad)
        return [y.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])

    for ours, reference in zip(run(cpu_linear.linear), run(F.linear)):
        torch.testing.assert_close(ours, reference)


@needs_float32
def test_inference_with_a_packed_weight_equals_f_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 40)
    x = torch.randn(4, 1, 32)
    with torch.inference_mode():
        packed = cpu_linear.pack(layer.weight)
        torch.testing.assert_close(cpu_linear.linear(x, layer.weight, layer.bias, packed), F.linear(x, layer.weight, layer.bias))


@needs_float32
def test_autocast_and_other_dtypes_are_left_to_f_linear():
    x = torch.randn(2, 8)
    assert cpu_linear.usable(x) and not cpu_linear.usable(x.double()) and not cpu_linear.usable(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_linear.usable(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_agrees_with_onednn_and_leaves_the_rng_alone(dtype):
    rng = torch.get_rng_state()
    verdict = cpu_linear.runs.__wrapped__(dtype)  # asked afresh, not the cached answer
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded run draws the same numbers with or without it
    x, w = torch.randn(64, 96).to(dtype), torch.randn(80, 96).to(dtype)
    try:
        y = cpu_linear.product(x, w)
    except RuntimeError:
        assert not verdict
    else:
        assert verdict
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the cap emulates an AVX2 CPU on an x86 CPU with AVX2 or more only")
def test_a_cpu_capped_at_avx2_gets_float32_only(repo_root):
    # what a plain AVX2 CPU (no AVX-512, no native bf16) gives, on any x86 machine: oneDNN has no bf16
    # kernel there, so bf16 must not be taken (it raised "could not create a primitive descriptor")
    code = ("import torch; from model import cpu_linear; from model.compute import describe_cpu; "
            "print(cpu_linear.runs(torch.float32), cpu_linear.runs(torch.bfloat16), cpu_linear.native_bf16()); "
            "print(describe_cpu())")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    verdicts, description = out.stdout.splitlines()
    assert verdicts.split() == ["True", "False", "False"]
    # what the benchmarks print: the ISAs the kernels really take, after the cap
    assert "ATen: AVX2 |" in description and "oneDNN: Intel AVX2 |" in description and "bf16: emulated" in description
