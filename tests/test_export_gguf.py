"""model/export_gguf.py: the file's layout read back with the gguf package, and the file run by
llama.cpp itself (tests/llama_cpp.py): f32 gives our logits and greedy tokens, q8_0 and f16 our first
tokens and, within a stated margin, our held-out loss; llama.cpp tokenizes text as we do."""

import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, SHARED_DATA, TINY_CONFIG as CONFIG
from llama_cpp import LlamaModel, need_llama_cpp
from model.export_gguf import gguf_name, write_gguf
from model.gpt import GPT
from model.prompt import CHAT_TEMPLATE
from model.tokenizer import EOT, VOCAB_SIZE, encode

Q8_0_LOSS_MARGIN = 0.01  # q8_0's held-out loss within 1% of ours
Q4_0_LOSS_MARGIN = 0.05
F16_LOSS_MARGIN = 0.001


@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory):
    """{type: path} of the trained model: the q8_0 file by the script, as a user runs it, the others in-process."""
    model, _, checkpoint = trained_tiny
    out = tmp_path_factory.mktemp("gguf")
    paths = {file_type: out / f"tiny-{file_type}.gguf" for file_type in ("f32", "f16", "q8_0", "q4_0")}
    proc = subprocess.run([sys.executable, "model/export_gguf.py", "--checkpoint", str(checkpoint), "--out",
                           str(paths["q8_0"])], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(q8_0," in proc.stdout  # the default type
    for file_type in ("f32", "f16", "q4_0"):
        write_gguf(model, paths[file_type], file_type)
    return paths


def our_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_tokens:
            logits, _ = model(torch.tensor([prompt + out]))
            out.append(int(logits[0, -1, :VOCAB_SIZE].argmax()))
    return out


def mean_nll(logits: torch.Tensor, tokens: list[int]) -> float:
    """Mean next-token loss of tokens[1:] given the logits after each prefix (rows 0..n-2)."""
    return F.cross_entropy(logits[: len(tokens) - 1, :VOCAB_SIZE].double(), torch.tensor(tokens[1:])).item()


PROMPTS = ["Count on from 3:", "Count on from 17: 18,", "Count on from 29: 30, 31, 32,"]


# ----------------------------------------------------------------------------- the file, read back

def test_the_file_has_llama_cpp_s_gpt2_layout_and_our_exact_weights(trained_tiny, exported):
    model, _, _ = trained_tiny
    reader = gguf.GGUFReader(exported["f32"])

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == CONFIG["block_size"] and field("gpt2.embedding_length") == CONFIG["n_embd"]
    assert field("gpt2.block_count") == CONFIG["n_layer"] and field("gpt2.attention.head_count") == CONFIG["n_head"]
    assert field("gpt2.feed_forward_length") == 4 * CONFIG["n_embd"]
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB_SIZE and tokens[EOT] == "<|endoftext|>" and tokens[220] == "Ġ"
    assert len(field("tokenizer.ggml.merges")) == 50000 and field("tokenizer.ggml.merges")[0] == "Ġ t"
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == EOT
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # llama.cpp takes the tied output from token_embd
    for name, tensor in model.state_dict().items():
        target = gguf_name(name)
        if target is None:
            continue
        expected = tensor.numpy()[:VOCAB_SIZE] if target == "token_embd.weight" else tensor.numpy()
        stored = tensors.pop(target)
        assert stored.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(stored.data).reshape(expected.shape), expected), target
    assert tensors == {}


def test_q8_0_quantizes_the_matrices_only_within_its_block_error(trained_tiny, exported):
    model, _, _ = trained_tiny
    reader = gguf.GGUFReader(exported["q8_0"])
    weights = {gguf_name(n): t.numpy() for n, t in model.state_dict().items() if gguf_name(n)}
    for t in reader.tensors:
        expected = weights[t.name][:VOCAB_SIZE] if t.name == "token_embd.weight" else weights[t.name]
        if expected.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        # each block of 32 has the scale d = max|w| / 127, stored in f16: rounding to a step errs by d / 2,
        # the scale's own rounding (2^-11 relative) by up to 127 steps of it
        d = np.abs(expected).reshape(-1, 32).max(1, keepdims=True) / 127
        assert np.all(np.abs(got - expected).reshape(-1, 32) <= d * (0.5 + 127 * 2**-11) + 1e-12), t.name
    f32_matrices = sum(int(t.n_bytes) for t in gguf.GGUFReader(exported["f32"]).tensors if len(t.shape) == 2)
    q8_matrices = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    assert q8_matrices == f32_matrices * 34 // 128  # 32 int8 values and an f16 scale for every 32 floats


def test_an_unreadable_checkpoint_is_explained_and_writes_nothing(tmp_path):
    out = tmp_path / "x.gguf"
    proc = subprocess.run([sys.executable, "model/export_gguf.py", "--checkpoint", str(tmp_path / "missing"), "--out",
                           str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- llama.cpp itself

@pytest.fixture(scope="module")
def llama():
    """{type: LlamaModel} over the exported files, closed at the end."""
    need_llama_cpp()
    loaded = {}
    yield loaded
    for m in loaded.values():
        m.close()


def load(llama, exported, file_type) -> LlamaModel:
    if file_type not in llama:
        llama[file_type] = LlamaModel(exported[file_type])
    return llama[file_type]


def test_llama_cpp_runs_f32_with_our_logits_and_greedy_tokens(trained_tiny, exported, llama):
    model, heldout, _ = trained_tiny
    ours_llama = load(llama, exported, "f32")
    assert ours_llama.n_vocab() == VOCAB_SIZE and ours_llama.meta("general.architecture") == "gpt2"
    with torch.no_grad():
        ours, _ = model(torch.tensor([heldout]))
    theirs = torch.tensor(ours_llama.logits(heldout))
    assert (theirs - ours[0, :, :VOCAB_SIZE]).abs().max() < 2e-3  # llama.cpp's attention runs its mask in f16
    for prompt in PROMPTS:
        tokens = encode(prompt)
        assert ours_llama.greedy(tokens, 12) == our_greedy(model, tokens, 12), prompt


@pytest.mark.parametrize("file_type, margin", [("q8_0", Q8_0_LOSS_MARGIN), ("f16", F16_LOSS_MARGIN),
                                               ("q4_0", Q4_0_LOSS_MARGIN)])
def test_llama_cpp_on_a_smaller_type_keeps_our_first_tokens_and_held_out_loss(trained_tiny, exported, llama, file_type,
                                                                              margin):
    model, heldout, _ = trained_tiny
    quantized = load(llama, exported, file_type)
    for prompt in PROMPTS:
        tokens = encode(prompt)
        assert quantized.greedy(tokens, 4) == our_greedy(model, tokens, 4), prompt
    with torch.no_grad():
        ours = mean_nll(model(torch.tensor([heldout]))[0][0], heldout)
    theirs = mean_nll(torch.tensor(quantized.logits(heldout)), heldout)
    assert ours < 0.5 * math.log(VOCAB_SIZE)  # the model learned the held-out world: the comparison means something
    assert abs(theirs - ours) <= margin * ours, (file_type, ours, theirs)
    print(f"{file_type}: held-out loss {theirs:.5f} against ours {ours:.5f} ({(theirs - ours) / ours:+.3%})")


def test_llama_cpp_tokenizes_text_exactly_as_we_do(exported, llama):
    """GPT-2's pre-tokenizer and merges in the file: llama.cpp's token ids equal tiktoken's."""
    texts = ["Hello world, café ### Response:\n", "  two  spaces\n\n\ttabs 1234567 it's can't I'M",
             "日本語のテキスト 😀 👩\u200d👩\u200d👧 e\u0301", "<|endoftext|> stays text"]
    if (SHARED_DATA / "tinyshakespeare.txt").is_file():
        texts.append((SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000])
    ours_llama = load(llama, exported, "f32")
    for text in texts:
        assert ours_llama.tokenize(text) == encode(text), text[:40]
