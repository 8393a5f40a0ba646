"""model/cpu_linear.py: oneDNN products equal F.linear's, forward and backward, on every path."""

import pytest
import torch
import torch.nn.functional as F

from model import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


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


def test_inference_with_a_packed_weight_equals_f_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 40)
    x = torch.randn(4, 1, 32)
    with torch.inference_mode():
        packed = cpu_linear.pack(layer.weight)
        torch.testing.assert_close(cpu_linear.linear(x, layer.weight, layer.bias, packed), F.linear(x, layer.weight, layer.bias))


def test_autocast_and_other_dtypes_are_left_to_f_linear():
    x = torch.randn(2, 8)
    assert cpu_linear.usable(x) and not cpu_linear.usable(x.double()) and not cpu_linear.usable(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_linear.usable(x)
