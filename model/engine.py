"""Inference on the one GPT module: a KV-cache engine that decodes many requests in one batch.

Every consumer that lets a model answer goes through here: the server (web/app.py), the terminal
chat (web/chat_cli.py, `generate`), and fine-tuning's sample answers and eval/exact_match.py
(`generate_batch`).

The cache holds max_rows rows of up to max_len tokens. Requests that are decoding sit in rows
0..n-1, so one decode step is a single forward over the view rows[:n], each row at its own
position: the new token's key and value are written at that row's position, and a mask lets each
row see only its own keys so far. A request that finishes or is cancelled leaves by swap-remove
(the last row moves into its place), so the others are undisturbed. A new request is prefilled in
row n, in chunks of at most prefill_chunk tokens so that a long prompt does not stall the decoding
rows for long, and joins the batch at the next step. Each row's greedy tokens are the same
whatever else is in the batch (tested).

The engine deals in token ids only and is synchronous: it is driven from one thread (the server
runs it in a native thread of its own, never on the gevent hub). Text, stop strings and UTF-8 are
TextStream's job, in model/text_stream.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from model.gpt import GPT
from model.text_stream import TextStream
from model.tokenizer import EOT, VOCAB_SIZE

# the one default of the API, the chat page and the terminal chat (OpenAI's is 1.0): a small model's
# samples at 1.0 draw often from its long tail of unlikely tokens; clients that send their own keep it
DEFAULT_TEMPERATURE = 0.7
MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's top_logprobs limit)

# A token's log-probability and its likeliest alternatives [(token, logprob), ...], most likely first
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; the meanings are OpenAI's chat completion parameters."""

    max_tokens: int = 256  # tokens to generate at most (the closing <|endoftext|> included)
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy: deterministic
    top_k: int = 0  # sample among the k likeliest tokens only; 0 = all
    top_p: float = 1.0  # nucleus: the smallest set of likeliest tokens whose probability reaches top_p
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence of the token
    seed: int | None = None  # a request with a seed samples from its own generator: reproducible
    stop: tuple[str, ...] = ()  # strings that end the text (TextStream's job; the engine never sees text)
    # log-probabilities, from the model's own distribution (before temperature, top-k/p and penalties):
    # None = none; k = each generated token's and its k likeliest alternatives (0 to MAX_LOGPROBS)
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also every prompt token's after the first (with `logprobs` alternatives)
    # completions of the prompt: its prefill is shared, then the n continue in rows of their own; with a
    # seed, completion i samples as a lone request seeded seed + i would
    n: int = 1


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its prompt, what it has generated, and where it is in the cache."""

    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)  # generated tokens; a closing <|endoftext|> is not kept
    sampled: int = 0  # tokens generated, the closing <|endoftext|> included (the usage count)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token; None for the first
    cached: int = 0  # tokens of prompt + output whose keys and values are in the cache
    row: int = -1  # its cache row while in the engine
    finish_reason: str | None = None  # "stop" (<|endoftext|>) or "length" (max_tokens or a full context)
    generator: torch.Generator | None = None
    siblings: list[Sequence] = field(default_factory=list)  # completions 1..n-1, once the prompt is in

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)


class LayerCache:
    """One layer's view of the cache for one forward: rows start..start+B, new tokens at write_pos (B, T)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: slice, write_pos: torch.Tensor, length: int):
        self.k, self.v, self.rows, self.write_pos, self.length = k, v, rows, write_pos, length

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
        # (B, nh, T, hs) -> (B, T, nh, hs), the layout of cache[rows][batch, :, write_pos]
        self.k[self.rows][batch, :, self.write_pos] = k.transpose(1, 2)
        self.v[self.rows][batch, :, self.write_pos] = v.transpose(1, 2)
        return self.k[self.rows, :, : self.length], self.v[self.rows, :, : self.length]


class Engine:
    """Continuous batching over a preallocated KV cache; see the module docstring."""

    def __init__(self, model: GPT, max_rows: int = 8, max_len: int | None = None, prefill_chunk: int = 256):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.config
        self.max_rows = max_rows
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        self.prefill_chunk = prefill_chunk
        shape = (cfg.n_layer, max_rows, cfg.n_head, self.max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.counts = torch.zeros(max_rows, VOCAB_SIZE, device=self.device)  # generated tokens per row, for penalties
        self.rows: list[Sequence] = []  # decoding, in cache rows 0..n-1
        self.prefilling: Sequence | None = None  # in cache row n
        self.generator = torch.Generator(self.device)
        self.generator.seed()  # unseeded requests differ from run to run, as users expect

    # --- admission and removal

    def has_room(self, rows: int = 1) -> bool:
        """Whether a new request of `rows` completions (SamplingParams.n) can start prefilling now."""
        return self.prefilling is None and len(self.rows) + rows <= self.max_rows

    def start(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Place a request in the free row; prefill_step() then feeds its prompt. With n > 1 the rows
        after it are kept for the other completions, which appear in seq.siblings when the prompt is in."""
        if not 1 <= params.n <= self.max_rows:
            raise ValueError(f"n must be 1 to {self.max_rows} (the engine's rows)")
        if not self.has_room(params.n):
            raise RuntimeError("no free row: check has_room() first")
        if not 1 <= len(prompt) <= self.max_len:
            raise ValueError(f"a prompt must have 1 to {self.max_len} tokens, got {len(prompt)}")
        if params.max_tokens < (0 if params.prompt_logprobs else 1):
            raise ValueError("max_tokens must be >= 1 (0 only to score the prompt: prompt_logprobs)")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be 0 to {MAX_LOGPROBS}")
        seq = Sequence(prompt=list(prompt), params=params, row=len(self.rows))
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.counts[seq.row].zero_()
        self.prefilling = seq
        return seq

    def release(self, seq: Sequence) -> None:
        """Take a request out (finished or cancelled): the last decoding row moves into its row."""
        if seq is self.prefilling:
            self.prefilling = None
        elif seq in self.rows:
            last = self.rows.pop()
            if last is not seq:
                self._move(last, seq.row)
                self.rows[seq.row] = last
            if self.prefilling is not None:  # keep it right after the decoding rows
                self._move(self.prefilling, len(self.rows))
        seq.row = -1

    def _move(self, seq: Sequence, row: int) -> None:
        n = seq.cached
        self.k[:, row, :, :n] = self.k[:, seq.row, :, :n]
        self.v[:, row, :, :n] = self.v[:, seq.row, :, :n]
        self.counts[row] = self.counts[seq.row]
        seq.row = row

    # --- steps (call under the engine's thread; each is one forward)

    @torch.inference_mode()
    def prefill_step(self) -> Sequence | None:
        """Feed the next chunk of the prefilling prompt. When the prompt is all in, sample its first
        token, move it into the decoding batch (or release it, if that token ended it) and return it."""
        seq = self.prefilling
        if seq is None:
            return None
        chunk = seq.prompt[seq.cached : seq.cached + self.prefill_chunk]
        scoring = seq.params.prompt_logprobs
        logits = self._forward([chunk], [seq.cached], slice(seq.row, seq.row + 1), every_position=scoring)
        if scoring:  # position j predicts prompt token cached + j + 1
            if seq.cached == 0:
                seq.prompt_logprobs.append(None)  # the first token has nothing before it
            following = seq.prompt[seq.cached + 1 : seq.cached + len(chunk) + 1]
            seq.prompt_logprobs += self._logprobs(logits[0, : len(following)], following, seq.params.logprobs or 0)
            logits = logits[:, -1]
        seq.cached += len(chunk)
        if not seq.prefilled:
            return None
        self.prefilling = None
        self.rows.append(seq)
        if seq.params.max_tokens == 0:  # the prompt scored, nothing to generate
            seq.finish_reason = "length"
            self.release(seq)
            return seq
        group = [seq] + [self._sibling(seq, i) for i in range(1, seq.params.n)]
        self._sample(logits.expand(len(group), -1), group)
        return seq

    def _sibling(self, seq: Sequence, i: int) -> Sequence:
        """Completion i of a prefilled prompt: a copy of its cache in the next free row."""
        sibling = Sequence(prompt=seq.prompt, params=seq.params, cached=seq.cached, row=len(self.rows),
                           prompt_logprobs=seq.prompt_logprobs)
        if seq.params.seed is not None:
            sibling.generator = torch.Generator(self.device).manual_seed((seq.params.seed + i) % 2**64)
        self.k[:, sibling.row, :, : seq.cached] = self.k[:, seq.row, :, : seq.cached]
        self.v[:, sibling.row, :, : seq.cached] = self.v[:, seq.row, :, : seq.cached]
        self.counts[sibling.row].zero_()
        self.rows.append(sibling)
        seq.siblings.append(sibling)
        return sibling

    @torch.inference_mode()
    def decode_step(self) -> list[Sequence]:
        """One token for every decoding request; the ones that finished are released. Returns them all."""
        seqs = list(self.rows)
        if not seqs:
            return []
        starts = [s.cached for s in seqs]
        logits = self._forward([[s.output[-1]] for s in seqs], starts, slice(0, len(seqs)))
        for s in seqs:
            s.cached += 1
        self._sample(logits, seqs)
        return seqs

    def _forward(self, tokens: list[list[int]], starts: list[int], rows: slice, every_position: bool = False) -> torch.Tensor:
        """Logits (B, vocab) after the last of each row's new tokens (all rows get the same count T), or
        (B, T, vocab) after every one of them."""
        T = len(tokens[0])
        length = max(starts) + T
        write_pos = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(T, device=self.device)
        mask = torch.arange(length, device=self.device) <= write_pos.unsqueeze(2)  # (B, T, length)
        cache = [LayerCache(self.k[i], self.v[i], rows, write_pos, length) for i in range(self.model.config.n_layer)]
        idx = torch.tensor(tokens, device=self.device)
        hidden = self.model.hidden(idx, write_pos, mask, cache)
        return self.model.lm_head(hidden if every_position else hidden[:, -1])

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
        """For each row of logits (n, vocab): the log-probability of its token and the k likeliest."""
        logp = logits[:, :VOCAB_SIZE].float().log_softmax(dim=-1)
        chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, device=logp.device)].tolist()
        if k == 0:
            return [(c, []) for c in chosen]
        top = logp.topk(k, dim=-1)
        return [(c, list(zip(ids, values))) for c, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist())]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Pick each row's next token, append it, and release the rows it finished."""
        logits = raw = logits[:, :VOCAB_SIZE].float()  # the padded vocabulary's rows are never tokens
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        freq = torch.tensor([[s.params.frequency_penalty] for s in seqs], device=self.device)
        pres = torch.tensor([[s.params.presence_penalty] for s in seqs], device=self.device)
        if freq.any() or pres.any():
            counts = self.counts[rows]
            logits = logits - freq * counts - pres * (counts > 0)
        greedy = logits.argmax(dim=-1).tolist()
        tokens = [greedy[i] if s.params.temperature == 0 else self._draw(logits[i], s) for i, s in enumerate(seqs)]
        self.counts[rows, torch.tensor(tokens, device=self.device)] += 1
        scored = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if scored:  # one log-softmax over every row that asked, each row then keeps its own k alternatives
            k = max(seqs[i].params.logprobs for i in scored)
            for i, (logprob, top) in zip(scored, self._logprobs(raw[scored], [tokens[i] for i in scored], k)):
                seqs[i].logprobs.append((logprob, top[: seqs[i].params.logprobs]))
        for s, token in zip(seqs, tokens):
            s.sampled += 1
            if token == EOT:
                s.finish_reason = "stop"
                if s.params.logprobs is not None:
                    s.logprobs.pop()  # the closing token is no text: OpenAI leaves it out too
            else:
                s.output.append(token)
                # the next step feeds this token at position cached: it needs a free slot there
                if s.sampled >= s.params.max_tokens or s.cached >= self.max_len:
                    s.finish_reason = "length"
            if s.finish_reason:
                self.release(s)

    def _draw(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the likeliest tokens until their mass reaches top_p (the first one always)
            outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=seq.generator or self.generator))


def generate(model: GPT, prompt: list[int], params: SamplingParams) -> Iterator[str]:
    """The text of one completion as it is generated, in deltas (stop strings and UTF-8 handled).

    A one-row engine, for a single user (the CLI, fine-tuning's sample answers); the server batches
    many requests in one engine instead. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, max_rows=1, max_len=min(model.config.block_size, len(prompt) + params.max_tokens))
        seq = engine.start(prompt, params)
        text = TextStream(params.stop)
        while seq.finish_reason is None and not text.stopped:
            before = len(seq.output)
            if engine.prefill_step() is None and seq.prefilled:
                engine.decode_step()
            for token in seq.output[before:]:
                if delta := text.push(token):
                    yield delta
                if text.stopped:
                    break
        if not text.stopped and (rest := text.flush()):
            yield rest
    finally:
        model.train(was_training)


def generate_batch(model: GPT, prompts: list[list[int]], params: SamplingParams, max_rows: int = 32) -> list[str]:
    """The whole completion of every prompt, decoded up to max_rows at a time in one engine.

    For offline evaluation of many prompts; each text is what generate() gives for that prompt
    alone (for greedy sampling, exactly: an engine row's tokens do not depend on its neighbours).
    """
    was_training = model.training
    model.eval()
    try:
        longest = max((len(p) for p in prompts), default=1)
        engine = Engine(model, max_rows=max(1, min(max_rows, len(prompts))),
                        max_len=min(model.config.block_size, longest + params.max_tokens))
        waiting = deque(range(len(prompts)))
        active: dict[int, tuple[Sequence, TextStream, list[int]]] = {}  # index -> (sequence, text, [tokens read])
        texts = [""] * len(prompts)
        while waiting or active:
            while waiting and engine.has_room():
                i = waiting.popleft()
                seq = engine.start(prompts[i], params)
                while engine.prefill_step() is None:  # the whole prompt, then its first token
                    pass
                active[i] = (seq, TextStream(params.stop), [0])
            for i, (seq, text, read) in list(active.items()):
                for token in seq.output[read[0] :]:
                    texts[i] += text.push(token)
                read[0] = len(seq.output)
                if text.stopped and seq.row >= 0:
                    engine.release(seq)  # a stop string ended it: its row is free for the next prompt
                if text.stopped or seq.finish_reason is not None:
                    texts[i] += text.flush()
                    del active[i]
            engine.decode_step()
        return texts
    finally:
        model.train(was_training)
