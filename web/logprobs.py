"""Log-probabilities in OpenAI's two shapes: the chat one (`logprobs.content`, with each token's raw
bytes) and the legacy text completion one (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

The figures come from the engine (model/engine.py: the model's own distribution, before temperature,
top-k/p and penalties). A GPT-2 token is a run of bytes that may end inside a UTF-8 character: its
`token` string shows such bytes as U+FFFD, and `bytes` (chat) carries them exactly.
"""

from __future__ import annotations

from model.engine import TokenLogprob
from model.tokenizer import get_tokenizer

# what a scored token is on the wire: its id and TokenLogprob, or None for a prompt's first token
Scored = tuple[int, TokenLogprob | None]


def token_bytes(token: int) -> bytes:
    return get_tokenizer().decode_single_token_bytes(token)


def token_text(token: int) -> str:
    return token_bytes(token).decode("utf-8", errors="replace")


def chat_logprobs(scored: list[Scored]) -> dict:
    """OpenAI's chat `logprobs` object for these tokens."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": token_text(token), "logprob": logprob, "bytes": list(token_bytes(token))}

    return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, (lp, top) in scored], "refusal": None}


def text_logprobs(scored: list[Scored], offset: int = 0) -> dict:
    """The legacy completion `logprobs` object for these tokens; offset: where the first one starts in
    the choice's text (each token's offset is the length of the token strings before it)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, figures in scored:
        text = token_text(token)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if figures is None:  # a prompt's first token: nothing before it to predict it
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(figures[0])
            top_logprobs.append({token_text(a): alp for a, alp in figures[1]})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}
