"""llama.cpp itself, for the GGUF tests and benchmarks: its C library (libllama, prebuilt) driven
through ctypes. Its log is silenced (LLAMA_CPP_LOG=1 shows it).

The build is the prebuilt Linux x64 one that the npm registry ships as @node-llama-cpp/linux-x64
(llama.cpp's libllama and libggml with CPU backends for each x86 ISA level, built on Ubuntu 22.04);
`make .venv/llama.cpp` unpacks its libraries into .venv/llama.cpp/ (LLAMA_CPP_LIB_DIR elsewhere).
PyPI has no prebuilt llama.cpp for this machine: llama-cpp-python ships only source that takes many
minutes to build, and llama-cpp-cffi's wheel needs a newer libstdc++ than Debian 12's.

Only the stable core of the C API is used: the parameter structs are taken from llama.cpp's own
defaults as opaque bytes (returned and passed by memory, whatever their layout), and llama_batch,
unchanged for years, is declared field by field.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

LIB_DIR = Path(os.environ.get("LLAMA_CPP_LIB_DIR", REPO_ROOT / ".venv" / "llama.cpp"))


def need_llama_cpp() -> None:
    """Skip where the prebuilt llama.cpp is missing; under CI it must be there."""
    if list(LIB_DIR.glob("libllama*.so")):
        return
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs llama.cpp's libraries in {LIB_DIR}: make .venv/llama.cpp unpacks them")
    pytest.skip(f"no llama.cpp in {LIB_DIR}: run make .venv/llama.cpp to test the GGUF files in it")


class Opaque(ctypes.Structure):
    """A parameter struct of llama.cpp's, as bytes: room for any version's layout (all are far smaller)."""

    _fields_ = [("bytes", ctypes.c_uint8 * 1024)]


class Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)), ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_quiet = _LOG_CALLBACK(lambda level, text, data: None)


_loaded: dict[str | None, ctypes.CDLL] = {}  # the one library of this process, by the CPU backend asked for


def _library(cpu: str | None) -> ctypes.CDLL:
    if cpu in _loaded:
        return _loaded[cpu]
    if _loaded:  # a second CPU backend would be registered beside the first, and llama.cpp takes the first
        raise RuntimeError(f"llama.cpp's CPU backend {next(iter(_loaded))!r} is loaded in this process already; "
                           f"{cpu!r} needs a process of its own")
    ggml = ctypes.CDLL(str(next(LIB_DIR.glob("libggml.*so"))), mode=ctypes.RTLD_GLOBAL)
    quiet = os.environ.get("LLAMA_CPP_LOG") != "1"  # its log is many lines per model and context
    if quiet:
        ggml.ggml_log_set.argtypes = [_LOG_CALLBACK, ctypes.c_void_p]
        ggml.ggml_log_set(_quiet, None)
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load.argtypes, ggml.ggml_backend_load.restype = [ctypes.c_char_p], ctypes.c_void_p
    if cpu is None:
        ggml.ggml_backend_load_all_from_path(str(LIB_DIR).encode())  # the CPU backend for this CPU's ISA
    elif not ggml.ggml_backend_load(str(LIB_DIR / f"libggml-cpu-{cpu}.so").encode()):
        raise RuntimeError(f"llama.cpp has no CPU backend {cpu!r} for this CPU in {LIB_DIR} (libggml-cpu-*.so)")
    lib = ctypes.CDLL(str(next(LIB_DIR.glob("libllama*.so"))))
    p = ctypes.c_void_p
    for name, restype, argtypes in [
        ("llama_backend_init", None, []),
        ("llama_log_set", None, [_LOG_CALLBACK, p]),
        ("llama_model_default_params", Opaque, []),
        ("llama_context_default_params", Opaque, []),
        ("llama_model_load_from_file", p, [ctypes.c_char_p, Opaque]),
        ("llama_model_free", None, [p]),
        ("llama_init_from_model", p, [p, Opaque]),
        ("llama_free", None, [p]),
        ("llama_set_n_threads", None, [p, ctypes.c_int32, ctypes.c_int32]),
        ("llama_model_get_vocab", p, [p]),
        ("llama_vocab_n_tokens", ctypes.c_int32, [p]),
        ("llama_vocab_eos", ctypes.c_int32, [p]),
        ("llama_tokenize", ctypes.c_int32, [p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                            ctypes.c_int32, ctypes.c_bool, ctypes.c_bool]),
        ("llama_batch_init", Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
        ("llama_batch_free", None, [Batch]),
        ("llama_decode", ctypes.c_int32, [p, Batch]),
        ("llama_get_logits_ith", ctypes.POINTER(ctypes.c_float), [p, ctypes.c_int32]),
        ("llama_model_meta_val_str", ctypes.c_int32, [p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if quiet:
        lib.llama_log_set(_quiet, None)
    lib.llama_backend_init()
    _loaded[cpu] = lib
    return lib


class LlamaModel:
    """A GGUF file loaded by llama.cpp: tokenize, logits of a token sequence, greedy continuation.

    cpu names one of the build's CPU backends (libggml-cpu-<cpu>.so: "haswell" is AVX2 as a Zen 2
    gets it) instead of the best for this CPU; one choice per process."""

    def __init__(self, path: str | Path, threads: int = 2, cpu: str | None = None):
        self.lib = _library(cpu)
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path} (LLAMA_CPP_LOG=1 shows its log, which says why)")
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.threads = threads

    def close(self) -> None:
        self.lib.llama_model_free(self.model)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode()

    def n_vocab(self) -> int:
        return self.lib.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of text (no BOS, special strings as plain text)."""
        data = text.encode()
        out = (ctypes.c_int32 * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(out), False, False)
        assert n >= 0, n
        return list(out[:n])

    @contextmanager
    def _context(self):
        ctx = self.lib.llama_init_from_model(self.model, self.lib.llama_context_default_params())
        assert ctx, "llama.cpp could not make a context"
        self.lib.llama_set_n_threads(ctx, self.threads, self.threads)
        try:
            yield ctx
        finally:
            self.lib.llama_free(ctx)

    def _decode(self, ctx, tokens: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed tokens at positions start.. and return the logits (rows, vocab) of every one (or of the last)."""
        batch = self.lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(all_logits or i == len(tokens) - 1)
            batch.n_tokens = len(tokens)
            assert self.lib.llama_decode(ctx, batch) == 0, "llama_decode failed"
            n = self.n_vocab()
            rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
            return np.stack([np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, i), shape=(n,)) for i in rows])
        finally:
            self.lib.llama_batch_free(batch)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits (len(tokens), vocab) after each prefix of tokens, in one forward pass."""
        with self._context() as ctx:
            return self._decode(ctx, tokens, 0, all_logits=True)

    def greedy(self, prompt: list[int], max_tokens: int, stop: int | None = None) -> list[int]:
        """Greedy continuation of prompt, through llama.cpp's KV cache one token at a time."""
        out: list[int] = []
        with self._context() as ctx:
            logits = self._decode(ctx, prompt, 0, all_logits=False)[-1]
            while len(out) < max_tokens:
                token = int(logits.argmax())
                out.append(token)
                if token == stop:
                    break
                logits = self._decode(ctx, [token], len(prompt) + len(out) - 1, all_logits=False)[-1]
        return out
