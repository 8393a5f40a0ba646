"""model/export_hf.py against transformers' own GPT2LMHeadModel, the reference: same keys, same logits,
lossless round trips, and errors that say what to do. Tiny random models, no network."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import model_state, save_checkpoint
from model.export_hf import export_hf, hf_state_dict, load_hf_model
from model.gpt import GPT, GPTConfig
from model.tokenizer import EOT, VOCAB_SIZE

transformers = pytest.importorskip(
    "transformers", reason="transformers is the reference: pip install -r requirements-test.txt"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)


def tiny_gpt(vocab_size: int = 50304, dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, dropout=dropout, **TINY))
    # LayerNorm gains and biases start at 1 and 0; randomise them so that a swapped or skipped tensor shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith("ln_1.weight") else 0.0, std=0.1)
    return model


def load_in_transformers(directory: Path, caplog: pytest.LogCaptureFixture) -> "transformers.GPT2LMHeadModel":
    """GPT2LMHeadModel.from_pretrained, asserting that every weight matched and nothing was reported."""
    caplog.clear()
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    # transformers logs its load report (and older releases their "newly initialized" / "not used"
    # warnings) through logging, which pytest's caplog receives
    for complaint in ("LOAD REPORT", "newly initialized", "not used"):
        assert complaint not in caplog.text
    return hf


def test_transformers_loads_export_and_gives_our_logits(tmp_path, caplog):
    model = tiny_gpt().eval()
    export_hf(model, tmp_path)
    hf = load_in_transformers(tmp_path, caplog).eval()
    assert hf.dtype == torch.float32 and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, VOCAB_SIZE, (2, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == (2, TINY["block_size"], VOCAB_SIZE)
    torch.testing.assert_close(ours[..., :VOCAB_SIZE], theirs, atol=1e-5, rtol=0)


def test_round_trip_of_padded_model_keeps_every_weight(tmp_path):
    model = tiny_gpt(vocab_size=50304)
    export_hf(model, tmp_path)
    back = load_hf_model(str(tmp_path))
    assert back.config == GPTConfig(vocab_size=VOCAB_SIZE, **TINY)  # imported weights stay unpadded
    ours = model.state_dict()
    for name, tensor in back.state_dict().items():
        expected = ours[name][:VOCAB_SIZE] if name in ("transformer.wte.weight", "lm_head.weight") else ours[name]
        assert torch.equal(tensor, expected), name
    assert back.lm_head.weight is back.transformer.wte.weight


def test_round_trip_of_unpadded_model_is_identical(tmp_path):
    model = tiny_gpt(vocab_size=VOCAB_SIZE, dropout=0.1)
    export_hf(model, tmp_path)
    back = load_hf_model(str(tmp_path))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_exported_tensors_are_contiguous_copies():
    model = tiny_gpt()
    sd = hf_state_dict(model)
    assert "lm_head.weight" not in sd and sd["transformer.wte.weight"].shape[0] == VOCAB_SIZE
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 64)  # Conv1D: (in, out)
    assert all(t.is_contiguous() for t in sd.values())
    ours = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    assert not ours & {t.untyped_storage().data_ptr() for t in sd.values()}


def test_loads_openai_layout_with_stale_buffers_from_pytorch_bin(tmp_path):
    """OpenAI's Hub files come from GPT2Model: no "transformer." prefix, plus the old causal-mask buffers;
    their config.json leaves out values that equal transformers' defaults."""
    model = tiny_gpt(vocab_size=VOCAB_SIZE)
    weights = {name.removeprefix("transformer."): t for name, t in hf_state_dict(model).items()}
    for i in range(TINY["n_layer"]):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    config = {"model_type": "gpt2", "n_positions": 64, "n_ctx": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = load_hf_model(str(tmp_path))
    assert back.config == GPTConfig(vocab_size=VOCAB_SIZE, dropout=0.1, **TINY)  # HF's default dropouts
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in back.state_dict().items())


def test_refuses_gpt2_variants_it_cannot_represent(tmp_path):
    export_hf(tiny_gpt(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_inner": 100, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="n_inner 100.*activation_function 'relu'"):
        load_hf_model(str(tmp_path))


def test_directory_missing_files_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json and no model.safetensors"):
        load_hf_model(str(tmp_path))
    export_hf(tiny_gpt(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors \(or pytorch_model.bin\)"):
        load_hf_model(str(tmp_path))


def test_hub_fetch_offline_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # offline mode makes huggingface_hub fail before any request; huggingface_hub reads the variable at
    # import, hence the constant. The empty cache keeps a previously downloaded gpt2 from answering, and
    # the socket guards turn any request that slips through into an immediate error instead of a wait.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(OSError, match="could not fetch.*openai-community/gpt2.*Pass a local directory in HF format"):
        load_hf_model("gpt2")


def test_cli_exports_a_checkpoint_that_transformers_loads(tmp_path, caplog):
    save_checkpoint(model_state(tiny_gpt()) | {"step": 1}, tmp_path / "run" / "step_000001.pt")
    out_dir = tmp_path / "hf"
    cmd = [sys.executable, "model/export_hf.py", "--checkpoint", str(tmp_path / "run"), "--out_dir", str(out_dir)]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    assert load_file(out_dir / "model.safetensors")["transformer.wte.weight"].shape[0] == VOCAB_SIZE
    load_in_transformers(out_dir, caplog)


def test_cli_missing_checkpoint_exits_2_with_a_message(tmp_path):
    out_dir = tmp_path / "hf"
    cmd = [sys.executable, "model/export_hf.py", "--checkpoint", str(tmp_path / "nope"), "--out_dir", str(out_dir)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "model/train_gpt2.py" in result.stderr
    assert "Traceback" not in result.stderr and not out_dir.exists()


def test_the_export_s_tokenizer_renders_chats_into_the_tokens_our_server_sends(tmp_path):
    """AutoTokenizer on the export: GPT-2's tokens for plain text, and apply_chat_template (our prompt
    template, from tokenizer_config.json) gives exactly the token ids of our rendering."""
    from test_prompt import TEMPLATE_CHATS

    from model.prompt import chat_turns, render_turns
    from model.tokenizer import encode

    export_hf(tiny_gpt(), tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_id == EOT and tokenizer.model_max_length == TINY["block_size"]
    for text in ["Hello world, café ### Response:\n", "  two  spaces\n\n\ttabs 1234567 it's", "日本語 😀 e\u0301"]:
        assert tokenizer.encode(text) == encode(text)
        assert tokenizer.decode(encode(text)) == text
    for messages in TEMPLATE_CHATS:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]  # transformers 5 returns a BatchEncoding
        assert ids == render_turns(chat_turns(messages, weights=True))[0], messages
