"""The GPT module: shapes, loss reductions, causality, GPT-2 initialisation, optimizer groups, FLOPs and MFU peaks."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import cpu_linear
from model.compute import bf16_peak_flops
from model.gpt import GPT, IGNORE_INDEX, GPTConfig

SMALL = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(SMALL).eval()


def test_forward_returns_full_logits_and_no_loss_without_targets(model):
    idx = torch.randint(0, 96, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 96) and loss is None


def test_loss_reductions_equal_cross_entropy_with_ignored_targets(model):
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    targets[0, :5] = IGNORE_INDEX
    logits, mean = model(idx, targets)
    reference = F.cross_entropy(logits.view(-1, 96), targets.view(-1), ignore_index=-100, reduction="none").view(3, 16)
    kept = targets != IGNORE_INDEX
    _, per_token = model(idx, targets, reduction="none")
    _, total = model(idx, targets, reduction="sum")
    torch.testing.assert_close(per_token, reference)
    assert (per_token[~kept] == 0).all()
    torch.testing.assert_close(total, reference[kept].sum())
    torch.testing.assert_close(mean, reference[kept].mean())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_without_logits_equals_the_full_loss_and_its_gradients(reduction):
    # instruction tuning's path: lm_head only where a target is, most of the batch being prompt
    torch.manual_seed(0)
    full, sparse = GPT(SMALL), GPT(SMALL)
    sparse.load_state_dict(full.state_dict())
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    targets[:, :11] = IGNORE_INDEX
    targets[1] = IGNORE_INDEX  # a row with no target at all
    logits, loss = full(idx, targets, reduction=reduction)
    none, sparse_loss = sparse(idx, targets, reduction=reduction, return_logits=False)
    assert logits is not None and none is None
    torch.testing.assert_close(sparse_loss, loss)
    loss.backward()
    sparse_loss.backward()
    for (name, a), b in zip(full.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_attention_is_causal(model):
    idx = torch.randint(0, 96, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 96
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_embedding_and_output_projection_are_tied(model):
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config)
    # >= 65k samples per tensor: the sample std is within 1% of the true one with overwhelming odds
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.02), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name
        elif name.endswith("bias"):
            assert (p == 0).all(), name
        else:
            assert "ln_" in name and (p == 1).all(), name  # LayerNorm gains


def test_optimizer_decays_only_matrices_and_embeddings(model):
    opt = model.configure_optimizer(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["fused"] is True  # torch has a fused AdamW for CPU


def test_flops_per_token_at_gpt2_124m_shape():
    model = GPT(GPTConfig())
    assert model.num_params() == 124_475_904  # 124M with the vocab padded to 50304
    expected = 6 * (model.num_params() - 1024 * 768) + 12 * 12 * 768 * 1024
    assert model.flops_per_token(1024) == expected


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla T4", None),
])
def test_mfu_peak_is_looked_up_by_whole_words_of_the_gpu_name(name, peak):
    assert bf16_peak_flops(name) == peak  # "L40" is not an L4, a PCIe H100 not an SXM one, a MIG slice not the card


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(AssertionError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))



@pytest.mark.skipif(not cpu_linear.runs(torch.float32), reason="oneDNN runs no float32 product here: nothing is packed")
def test_packed_cpu_inference_equals_plain_and_never_goes_stale(model):
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    with torch.inference_mode():
        plain = model(idx)[0]
    assert model.pack_for_cpu_inference()
    assert not any("packed" in k for k in model.state_dict())  # the packed copies are not state
    with torch.inference_mode():
        torch.testing.assert_close(model(idx)[0], plain)
        # each row gets the same logits alone as in a batch of three (decoding relies on it)
        alone = torch.cat([model(idx[i : i + 1])[0] for i in range(3)])
        assert torch.equal(alone, model(idx)[0])
    # training computes with the live weights, and after an optimizer step inference does too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    with torch.inference_mode():
        after = model(idx)[0]
    model.lm_head.packed = None
    for block in model.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            layer.packed = None
    with torch.inference_mode():
        assert torch.equal(after, model(idx)[0])
    assert not torch.equal(after, plain)


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_bf16_autocast_training_step_matches_float32(onednn, request):
    # under CPU bf16 autocast the loss-only forward takes the bf16 fused loss (where oneDNN multiplies
    # bf16 here) and float32 attention; without oneDNN, torch's own kernels. Either way its loss and
    # gradients must be float32's up to bf16 rounding, for every parameter
    if not onednn:
        request.getfixturevalue("without_onednn")
    torch.manual_seed(0)
    model = GPT(SMALL).train()
    idx, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    targets[0, :5] = IGNORE_INDEX

    def loss_and_grads(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx, targets, return_logits=False)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss16, grads16 = loss_and_grads(True)
    loss32, grads32 = loss_and_grads(False)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0)
    for name, g in grads32.items():
        torch.testing.assert_close(grads16[name], g, rtol=0, atol=5e-2 * g.abs().max().item(), msg=name)


def test_where_onednn_runs_nothing_the_model_uses_torch_and_does_not_pack(model, without_onednn):
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    _, loss = model(idx, targets, return_logits=False)
    loss.backward()
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"  # F.cross_entropy, not the fused loss
    assert all(type(p.grad) is torch.Tensor and p.grad is not None for p in model.parameters())
    assert not model.pack_for_cpu_inference()  # nothing to pack with: decoding uses F.linear
    assert all(getattr(m, "packed", None) is None for m in model.modules())
    with torch.inference_mode():
        logits = model(idx)[0]
    torch.testing.assert_close(logits, F.linear(model.hidden(idx), model.lm_head.weight))
