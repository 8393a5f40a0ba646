"""The offline GPT-2 tokenizer: no network, GPT-2's exact ids, exact round trips, EOT only by id."""

import socket

import pytest

import model.tokenizer as tokenizer
from model.tokenizer import EOT, decode, encode, get_tokenizer


def test_builds_with_networking_disabled(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    get_tokenizer.cache_clear()
    enc = get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT


def test_gpt2_reference_ids():
    # ids from OpenAI's GPT-2 vocabulary
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]
    assert decode([EOT]) == "<|endoftext|>"


def test_literal_endoftext_in_text_is_ordinary_text():
    ids = encode("a <|endoftext|> b")
    assert EOT not in ids
    assert decode(ids) == "a <|endoftext|> b"


@pytest.mark.parametrize("text", ["naïve café", "日本語のテキスト", "emoji 🙂👍🏽 and flags 🇫🇷", "e\u0301 combining", "tabs\tand\nnewlines\r\n"])
def test_unicode_round_trips(text):
    assert decode(encode(text)) == text


def test_tinyshakespeare_round_trips_exactly(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = encode(text)
    assert max(ids) < EOT
    assert decode(ids) == text


def test_tampered_vocabulary_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer, "VOCAB_BPE_SHA256", "0" * 64)
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="reinstall"):
            get_tokenizer()
    finally:
        get_tokenizer.cache_clear()
