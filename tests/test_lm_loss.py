"""model/lm_loss.py: the fused CPU loss equals F.cross_entropy of lm_head, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

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


def test_autocast_and_empty_targets_take_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    h, targets = torch.randn(6, 8), torch.randint(0, 20, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(lm_loss(h, head, targets, "mean"), F.cross_entropy(head(h).float(), targets))
    empty = lm_loss(h[:0], head, targets[:0], "mean")
    assert torch.isnan(empty)  # as F.cross_entropy: a mean over no targets
