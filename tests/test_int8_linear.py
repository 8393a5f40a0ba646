"""model/int8_linear.py and GPT.prepare_inference("int8"): per-channel int8 within its rounding error,
both product paths equal to the dequantized weight's product, rows independent of their batch, and a
trained model that keeps its greedy answers and its held-out loss within 1%."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model import int8_linear
from model.engine import SamplingParams, generate, generate_batch
from model.gpt import GPT, GPTConfig, Linear
from model.int8_linear import KERNEL_ROWS, linear, quantize, round_up_to_bf16
from model.tokenizer import VOCAB_SIZE, encode

INT8_LOSS_MARGIN = 0.01  # held-out loss within 1% of float32's, as llama.cpp's q8_0 (tests/test_export_gguf.py)


@pytest.fixture
def without_int8_kernel(monkeypatch):
    """As with a torch whose int8 kernel does not run here: every product dequantizes."""
    monkeypatch.setattr(int8_linear, "kernel_runs", lambda: False)


def test_scales_round_up_to_the_nearest_bf16_value():
    torch.manual_seed(0)
    x = (torch.rand(10_000) + 1e-3) * 10.0 ** torch.randint(-8, 3, (10_000,)).float()
    up = round_up_to_bf16(x)
    assert torch.equal(up.bfloat16().float(), up)  # exactly representable in bf16
    assert torch.all(up >= x)
    below = (up.view(torch.int32) - 0x10000).view(torch.float32)  # the bf16 value under it
    assert torch.all(below < x)
    exact = torch.tensor([1.0, 0.5, 3.0])
    assert torch.equal(round_up_to_bf16(exact), exact)


def test_quantize_is_per_channel_int8_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # channels of very different ranges
    w[5] = 0.0
    q = quantize(w)
    assert q.values.dtype == torch.int8 and q.values.shape == w.shape and q.scale.shape == (48,)
    assert q.values.abs().max() <= 127 and q.scale.dtype == torch.bfloat16  # as the kernel takes them
    assert torch.all((q.dequantize() - w).abs() <= q.scale.float()[:, None] / 2 * (1 + 1e-6))
    assert torch.all(q.values[5] == 0)
    # each channel's range is used: its largest value lands within a bf16 rounding of 127 steps
    assert torch.all(q.values.abs().amax(1)[torch.arange(48) != 5] >= 126)
    assert q.nbytes() == 48 * 64 + 48 * 2


@pytest.mark.parametrize("shape", [(1,), (5,), (KERNEL_ROWS,), (KERNEL_ROWS + 1,), (3, 20)])  # (3, 20): 60 rows
@pytest.mark.parametrize("bias", [True, False])
def test_both_paths_give_the_dequantized_weights_product(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80, bias=bias)
    q = quantize(layer.weight)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        got = linear(x, q, layer.bias)
    reference = F.linear(x.double(), q.dequantize().double(), None if layer.bias is None else layer.bias.double())
    assert got.shape == (*shape, 80) and got.dtype == torch.float32
    on_kernel = math.prod(shape) <= KERNEL_ROWS and int8_linear.kernel_runs()
    # the kernel takes bf16 activations and gives a bf16 result; the other path is a float32 product
    tolerance = 2e-2 if on_kernel else 1e-5
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=tolerance * reference.abs().max().item())


def test_widths_the_kernel_cannot_take_are_dequantized():
    # torch's kernel reads rows 16 values at a time: at 40 it summed past the row, at 100 it crashed
    torch.manual_seed(0)
    for width in (40, 100):
        layer = torch.nn.Linear(width, 24)
        q = quantize(layer.weight)
        x = torch.randn(3, width)
        with torch.inference_mode():
            torch.testing.assert_close(linear(x, q, layer.bias), F.linear(x, q.dequantize(), layer.bias))


def test_values_gathered_in_huge_pages_are_the_same_numbers_on_cache_lines():
    torch.manual_seed(0)
    weights = [quantize(torch.randn(n, 64)) for n in (3, 48, 5)]  # 192 values: not a whole number of lines
    before = [w.values.clone() for w in weights]
    x = torch.randn(2, 64)
    with torch.inference_mode():
        products = [linear(x, w) for w in weights]
    if not int8_linear.gather_in_huge_pages(weights):
        pytest.skip("no transparent huge pages here (not Linux, or THP disabled)")
    storage = {w.values.untyped_storage().data_ptr() for w in weights}
    assert len(storage) == 1  # one buffer
    assert all(w.values.data_ptr() % int8_linear.CACHE_LINE == 0 for w in weights)
    with torch.inference_mode():
        for w, values, product in zip(weights, before, products):
            assert torch.equal(w.values, values) and torch.equal(linear(x, w), product)


def test_without_the_kernel_every_product_dequantizes(without_int8_kernel):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    q = quantize(layer.weight)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, q, layer.bias), F.linear(x, q.dequantize(), layer.bias))


@pytest.mark.skipif(not int8_linear.kernel_runs(), reason="torch's int8 kernel does not run here")
def test_kernel_runs_here_and_each_row_gets_the_same_bits_in_any_batch():
    # the engine relies on it: a request's greedy tokens do not depend on the requests beside it
    torch.manual_seed(0)
    q = quantize(torch.randn(80, 96))
    x = torch.randn(KERNEL_ROWS, 96)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i : i + 1], q) for i in range(KERNEL_ROWS)])
        for rows in (2, 7, KERNEL_ROWS):
            assert torch.equal(linear(x[:rows], q), alone[:rows]), rows


def int8_model(model: GPT) -> GPT:
    int8 = copy.deepcopy(model).eval()
    assert int8.prepare_inference("int8").startswith("int8 weights")
    return int8


@pytest.mark.parametrize("path", ["kernel", "dequantize"])
def test_every_linear_is_int8_and_the_token_table_stays(trained_tiny, path, monkeypatch):
    if path == "kernel":  # the held-out text's 64 rows on the kernel too
        if not int8_linear.kernel_runs():
            pytest.skip("torch's int8 kernel does not run here")
        monkeypatch.setattr(int8_linear, "KERNEL_ROWS", 1 << 30)
    model, heldout, _ = trained_tiny
    int8 = int8_model(model)
    linears = [m for m in int8.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1  # the tied vocabulary projection included
    assert all(m.weight is None and m.int8 is not None and m.packed is None for m in linears)
    assert torch.equal(int8.transformer.wte.weight, model.transformer.wte.weight)  # lookups stay float32
    assert torch.equal(int8.lm_head.int8.values, quantize(model.lm_head.weight).values)
    # the model computes with those int8 weights: a float model holding the dequantized ones (and wte's
    # float32 table, untied from them) agrees
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in dequantized.modules():
            if isinstance(module, Linear):
                module.weight = torch.nn.Parameter(quantize(module.weight).dequantize())
        idx = torch.tensor([heldout])
        expected = dequantized(idx)[0]
        # the kernel rounds activations and outputs to bf16 (8 bits of mantissa) in each of the 9 products
        tolerance = 3e-2 * expected.abs().max().item() if path == "kernel" else 1e-4
        torch.testing.assert_close(int8(idx)[0], expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("path", ["kernel", "dequantize"])
def test_a_trained_model_keeps_its_answers_and_held_out_loss(trained_tiny, path, request, monkeypatch):
    if path == "kernel":  # every product on the kernel, the held-out text's 64 rows too
        if not int8_linear.kernel_runs():
            pytest.skip("torch's int8 kernel does not run here")
        monkeypatch.setattr(int8_linear, "KERNEL_ROWS", 1 << 30)
    else:
        request.getfixturevalue("without_int8_kernel")
    model, heldout, _ = trained_tiny
    int8 = int8_model(model)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompts = ["Count on from 3:", "Count on from 17: 18,", "Count on from 29: 30, 31, 32,"]
    for prompt in prompts:
        assert "".join(generate(int8, encode(prompt), greedy)) == "".join(generate(model, encode(prompt), greedy))
    # the engine's rows: alone or batched, the same answers (generate_batch is exact for greedy)
    batched = generate_batch(int8, [encode(p) for p in prompts], greedy)
    assert batched == ["".join(generate(int8, encode(p), greedy)) for p in prompts]

    def loss(m: GPT) -> float:
        with torch.no_grad():
            logits = m(torch.tensor([heldout]))[0][0, :-1, :VOCAB_SIZE]
        return F.cross_entropy(logits.double(), torch.tensor(heldout[1:])).item()

    ours, theirs = loss(model), loss(int8)
    assert ours < 0.5 * math.log(VOCAB_SIZE)  # the model learned the held-out world: the comparison means something
    assert abs(theirs - ours) <= INT8_LOSS_MARGIN * ours, (ours, theirs)
    print(f"{path}: held-out loss {theirs:.5f} against float32's {ours:.5f} ({(theirs - ours) / ours:+.3%})")


def test_quant_is_checked_and_an_int8_model_is_not_prepared_again():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    with pytest.raises(ValueError, match="one of none, int8"):
        model.prepare_inference("int4")
    assert model.prepare_inference("int8").startswith("int8 weights")
    for quant in ("int8", "none"):
        with pytest.raises(ValueError, match="int8 weights already"):
            model.prepare_inference(quant)
    # its loss takes the plain path: there is no float weight to fuse with the cross-entropy
    idx = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        _, fused = model(idx, idx, return_logits=False)
        _, plain = model(idx, idx)
    torch.testing.assert_close(fused, plain)
    with pytest.raises(ValueError, match="decoding on CPU"):
        GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).to("meta").prepare_inference("int8")
