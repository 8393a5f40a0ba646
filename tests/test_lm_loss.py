"""model/lm_loss.py: the fused CPU losses equal F.cross_entropy of lm_head, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from model import cpu_linear
from model import lm_loss as lm_loss_module
from model.lm_loss import lm_loss

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _loss_and_grads(fn, h, head, targets, reduction, upstream):
    h = h.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = fn(h, head, targets, reduction)
    (loss * upstream).backward()  # an upstream gradient other than 1, as gradient accumulation gives
    return loss.detach(), h.grad, head.weight.grad


def _reference(h, head, targets, reduction):
    return F.cross_entropy(F.linear(h, head.weight), targets, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n_embd,vocab", [(16, 400), (64, 48)])  # both weight-gradient paths of cpu_linear
def test_fused_loss_and_gradients_equal_cross_entropy(reduction, n_embd, vocab):
    torch.manual_seed(0)
    head = torch.nn.Linear(n_embd, vocab, bias=False)
    h = torch.randn(37, n_embd) * 4  # confident logits: log-softmax far from uniform
    targets = torch.randint(0, vocab, (37,))
    ours = _loss_and_grads(lm_loss, h, head, targets, reduction, 0.25)
    reference = _loss_and_grads(_reference, h, head, targets, reduction, 0.25)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_in_place_log_softmax_is_bitwise_the_out_of_place_one():
    # the fused loss writes the log-softmax over the logits; it relies on this
    torch.manual_seed(0)
    logits = torch.randn(5, 50304) * 8
    inplace = logits.clone()
    torch.ops.aten._log_softmax.out(inplace, -1, False, out=inplace)
    assert torch.equal(inplace, torch.log_softmax(logits, -1))


def _autocast_reference(h, head, targets, reduction):
    # what autocast gives without the fused path: bf16 logits, float32 cross-entropy
    return F.cross_entropy(head(h).float(), targets, reduction=reduction)


def _in_bf16_autocast(fn):
    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args)
    return run


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("rows_at_once", [64, 5])  # all rows in one piece, or pieces with a short last one
def test_bf16_autocast_loss_and_gradients_equal_autocast_cross_entropy(reduction, rows_at_once, monkeypatch):
    monkeypatch.setattr(lm_loss_module, "CHUNK_BYTES", 4 * 400 * rows_at_once)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 400, bias=False)
    h = torch.randn(37, 16) * 4
    targets = torch.randint(0, 400, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = type(lm_loss(h.requires_grad_(), head, targets, reduction).grad_fn).__name__.startswith("_LinearCrossEntropyBF16")
    assert fused == cpu_linear.runs(torch.bfloat16)  # fused where oneDNN multiplies bf16 here, else autocast's own path
    ours = _loss_and_grads(_in_bf16_autocast(lm_loss), h, head, targets, reduction, 0.25)
    reference = _loss_and_grads(_in_bf16_autocast(_autocast_reference), h, head, targets, reduction, 0.25)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=0)  # the same bf16 logits, float32 after
    for a, b in zip(ours[1:], reference[1:]):  # bf16 products: equal to bf16's precision
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * b.abs().max().item())
    with torch.no_grad():  # validation: the loss alone, the same value
        torch.testing.assert_close(_in_bf16_autocast(lm_loss)(h, head, targets, reduction), ours[0], rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_where_onednn_runs_nothing_the_loss_is_cross_entropy(bf16, without_onednn):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 400, bias=False)
    h, targets = torch.randn(37, 16) * 4, torch.randint(0, 400, (37,))
    run = _in_bf16_autocast(lm_loss) if bf16 else lm_loss
    loss = run(h.requires_grad_(), head, targets, "mean")
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"
    reference = (_in_bf16_autocast(_autocast_reference) if bf16 else _reference)(h, head, targets, "mean")
    torch.testing.assert_close(loss, reference)


def test_other_cases_take_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    h, targets = torch.randn(6, 8), torch.randint(0, 20, (6,))
    with torch.autocast("cpu", dtype=torch.float16):  # no fused path for float16
        torch.testing.assert_close(lm_loss(h, head, targets, "mean"), F.cross_entropy(head(h).float(), targets))
    empty = lm_loss(h[:0], head, targets[:0], "mean")
    assert torch.isnan(empty)  # as F.cross_entropy: a mean over no targets
