"""Reading an OpenAI completion request, chat (/v1/chat/completions) or text (/v1/completions): every
field checked before anything is generated.

The rule (../shared/openai_contract.md §4): hints may be ignored, but a parameter that changes the
shape of the response is honoured or refused with 400, never silently ignored. Unknown fields are
ignored and an explicit null means the default, as OpenAI's own API does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from model.engine import DEFAULT_TEMPERATURE, MAX_LOGPROBS, SamplingParams
from model.prompt import ChatError, Turn, chat_turns, check_awaiting
from model.tokenizer import EOT, VOCAB_SIZE, decode, encode

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # n at most: each choice takes a row of the batch (NANOGPT_MAX_ROWS)
MAX_PROMPTS = 32  # prompts in one /v1/completions request (each is queued as a request of its own)


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatRequest:
    """A validated request. max_tokens is None when not given: the rest of the context."""

    model: str
    turns: list[Turn]  # the messages as model/prompt.py renders them; the last awaits its reply
    params: SamplingParams
    max_tokens: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class TextRequest:
    """A validated /v1/completions request: raw prompts, no template; n choices for each prompt.
    max_tokens 0 generates nothing (the echoed prompt alone, scored with logprobs)."""

    model: str
    prompts: list[list[int]]  # token ids; an empty prompt is <|endoftext|>, as GPT-2 samples unconditionally
    prompt_texts: list[str]  # what `echo` puts before each prompt's completions
    params: SamplingParams
    max_tokens: int
    stream: bool
    include_usage: bool
    echo: bool


def parse_body(data: bytes) -> dict:
    """The request body as a JSON object, or 400."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, not {type(body).__name__}")
    return body


def parse_chat_request(body: dict) -> ChatRequest:
    """Check every field of a /v1/chat/completions body; raises APIError(400) naming the bad one."""
    model = _model(body)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of message objects", "messages")
    try:
        turns = chat_turns(messages)
        check_awaiting(turns)
    except ChatError as e:
        raise invalid(str(e), e.param) from None

    max_tokens = _integer(body, "max_tokens", 1)
    if body.get("max_completion_tokens") is not None:  # the newer name wins (newer SDKs send only it)
        max_tokens = _integer(body, "max_completion_tokens", 1)

    _refuse_unsupported(body)
    stream, include_usage = _streaming(body)
    logprobs, top = _boolean(body, "logprobs"), _integer(body, "top_logprobs", 0)
    if top is not None and top > MAX_LOGPROBS:
        raise invalid(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top}", "top_logprobs")
    if top and not logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params = replace(_sampling(body), logprobs=(top or 0) if logprobs else None)
    return ChatRequest(model, turns, params, max_tokens, stream, include_usage)


TEXT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
TEXT_MAX_LOGPROBS = 5  # the legacy endpoint's limit


def parse_text_request(body: dict) -> TextRequest:
    """Check every field of a /v1/completions body (OpenAI's legacy schema); raises APIError(400)."""
    model = _model(body)
    prompts, prompt_texts = _prompts(body.get("prompt"))
    if body.get("suffix") not in (None, ""):
        raise invalid("'suffix' (insertion) is not supported: this model only continues text", "suffix")
    max_tokens = _integer(body, "max_tokens", 0)
    max_tokens = TEXT_MAX_TOKENS if max_tokens is None else max_tokens
    echo = _boolean(body, "echo")
    _refuse_unsupported(body)
    stream, include_usage = _streaming(body)
    logprobs = _integer(body, "logprobs", 0)
    if logprobs is not None and logprobs > TEXT_MAX_LOGPROBS:
        raise invalid(f"'logprobs' must be between 0 and {TEXT_MAX_LOGPROBS}, got {logprobs}", "logprobs")
    # with echo, the prompt's tokens are scored too: how evaluation harnesses read a prompt's likelihood
    params = replace(_sampling(body), logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
    return TextRequest(model, prompts, prompt_texts, params, max_tokens, stream, include_usage, echo)


def _prompts(prompt: object) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids and texts: a string, an array of token ids, or an array of either (a batch)."""
    def token_ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or token_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or token_ids(p) for p in prompt):
        raise invalid("'prompt' must be a string, an array of token ids, or an array of strings or of token-id arrays",
                      "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise invalid(f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(prompt)}", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(encode(p) or [EOT])
            texts.append(p)
        elif not all(0 <= t < VOCAB_SIZE for t in p):
            raise invalid(f"'prompt' token ids must be between 0 and {VOCAB_SIZE - 1}", "prompt")
        else:
            ids.append(list(p))
            texts.append(decode(p))
    return ids, texts


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) of a body."""
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    return stream, stream and options is not None and _boolean(options, "include_usage", "stream_options.include_usage")


def _sampling(body: dict) -> SamplingParams:
    """The sampling parameters both endpoints share (max_tokens is set once the prompt's room is known)."""
    return SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=_integer(body, "top_k", 0) or 0,  # not OpenAI's, but many clients send it
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        seed=_seed(body),
        stop=_stop(body),
        n=_choices(body),
    )


def _choices(body: dict) -> int:
    n = _integer(body, "n", 1)
    if n is not None and n > MAX_CHOICES:
        raise invalid(f"'n' must be from 1 to {MAX_CHOICES}, got {n}", "n")
    return n or 1


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: one of the ids GET /v1/models lists", "model")
    return model


def _refuse_unsupported(body: dict) -> None:
    """Parameters that would change the response's shape, which this server does not do."""
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or "type" not in response_format:
            raise invalid("'response_format' must be an object with a 'type'", "response_format")
        if response_format["type"] != "text":
            raise invalid(
                f"response_format type {response_format['type']!r} is not supported: this model's output is "
                "not constrained to JSON (use 'text')",
                "response_format",
            )
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise invalid("This model cannot call tools: tool_choice must be 'auto' or 'none'", "tool_choice")


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{name}' must be a number between {low:g} and {high:g}", name)
    if not low <= value <= high:  # NaN fails this too
        raise invalid(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise invalid(f"'{name}' must be an integer >= {low}, got {value!r}", name)
    return value


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{param or name}' must be true or false", param or name)
    return value


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid("'seed' must be an integer", "seed")
    return seed % 2**64  # torch generators take 64-bit seeds; OpenAI's are signed


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or an array of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)  # an empty string would stop before the first token
