"""The OpenAI contract end to end: the official `openai` package against a real gunicorn + gevent
server (gunicorn_config.py, one worker) started on a free 127.0.0.1 port.

The server runs with gunicorn's heartbeat `--timeout 2` and gevent's blocking monitor on, so any
torch work on the hub would show up as "appears to be blocked" in its log (checked last) or as a
killed worker, in every test of this module.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import struct
import threading
import time
import urllib.parse

import openai
import pytest
import torch

from serving import ECHO_PROMPT, ECHO_REPLY, gunicorn_server, write_echo_model, write_model, write_nan_model
from model.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint
from model.engine import SamplingParams, generate
from model.prompt import chat_turns, prompt_tokens
from model.gpt import GPTConfig
from model.tokenizer import VOCAB_SIZE, encode
from eval.hellaswag import Example, score

KEY = "sk-test-2"
TINY = GPTConfig(block_size=1024, n_layer=2, n_head=2, n_embd=64)
# wide enough that a 1000-token stream outlasts gunicorn's --timeout 2 with packed CPU weights: each
# token reads 211 MB (the lm_head alone 154 MB), 3.4 s of engine time for the stream on the 2-core dev
# VM; at n_embd 384 packing brought it down to 1.7 s, under the timeout it must outlast
WIDE = GPTConfig(block_size=1024, n_layer=2, n_head=4, n_embd=768)
ECHO_MESSAGES = [{"role": "user", "content": ECHO_PROMPT}]
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_model(models, "tiny", TINY)
    write_model(models, "wide", WIDE)
    write_echo_model(models, "echo")
    write_nan_model(models, "broken")
    (models / "no-checkpoint").mkdir()
    env = {
        "NANOGPT_API_KEYS": "sk-test-1, sk-test-2",
        "NANOGPT_MAX_ROWS": "24",
        "NANOGPT_MAX_MODELS": "4",
        "NANOGPT_KEEPALIVE": "0.5",
        "GEVENT_MONITOR_THREAD_ENABLE": "1",
        "GEVENT_MAX_BLOCKING_TIME": "0.1",
    }
    log = tmp_path_factory.mktemp("logs") / "gunicorn.log"
    with gunicorn_server(models, log, env, args=("--timeout", "2")) as s:
        s.models = models
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def raw(server, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEY):
    """(status, headers, body bytes) of one plain HTTP request."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=30)
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    result = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return result


def sse_events(body: bytes) -> list:
    """The data of each event, checking OpenAI's framing: only `data:` lines and `:` comments,
    one line of JSON each (or [DONE]), no event/id/retry fields."""
    events = []
    for line in body.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat_body(model="echo", messages=ECHO_MESSAGES, **kw) -> dict:
    return {"model": model, "messages": messages, **kw}


# --- models


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["broken", "echo", "tiny", "wide"]  # the run without a checkpoint is no model
    for m in models:
        assert m.object == "model" and m.owned_by and isinstance(m.created, int) and m.created > 1_600_000_000
    assert client.models.retrieve("echo").id == "echo"
    for bad in ["nope", ".hidden", "no-checkpoint"]:
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(bad)
        assert e.value.code == "model_not_found"


def test_model_ids_never_leave_the_models_dir(server):
    for path in ["/v1/models/../tiny", "/v1/models/%2e%2e%2Ftiny", "/v1/models/tiny%2F..%2Fecho", "/v1/models/%2Fetc%2Fpasswd"]:
        status, headers, body = raw(server, "GET", path)
        assert status == 404 and headers["content-type"] == "application/json", path
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    status, _, body = raw(server, "POST", "/v1/chat/completions", chat_body(model="../echo"))
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


# --- chat completions


def test_chat_response_shape(server):
    status, headers, body = raw(server, "POST", "/v1/chat/completions", chat_body(temperature=0))
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["model"] == "echo" and reply["id"].startswith("chatcmpl-")
    assert isinstance(reply["created"], int)
    (choice,) = reply["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": ECHO_REPLY, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "system_fingerprint" not in reply


def test_stream_framing_and_chunks(server):
    status, headers, body = raw(server, "POST", "/v1/chat/completions", chat_body(stream=True, temperature=0))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and "content-length" not in headers
    assert headers["access-control-allow-origin"] == "*"
    events = sse_events(body)
    assert events[-1] == "[DONE]" and body.endswith(b"data: [DONE]\n\n")
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)  # not asked for
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ECHO_REPLY and "\ufffd" not in text
    assert len(chunks) > 4  # really streamed, in pieces


def test_include_usage(server, client):
    status, _, body = raw(
        server, "POST", "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True}, temperature=0)
    )
    chunks = sse_events(body)[:-1]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    streamed_usage = chunks[-1]["usage"]
    reply = client.chat.completions.create(model="echo", messages=ECHO_MESSAGES, temperature=0)
    assert streamed_usage == {k: getattr(reply.usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def stream_text(client, **kw) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize(
    "model,messages,extra",
    [
        ("echo", ECHO_MESSAGES, {}),  # CJK and emoji split across tokens
        ("tiny", HI, {"max_tokens": 40}),
        ("tiny", [{"role": "user", "content": "日本語と絵文字🎉🙂を混ぜて"}], {"max_tokens": 60}),
    ],
)
def test_temperature_0_stream_equals_non_stream(client, model, messages, extra):
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, **extra)
    text, finish = stream_text(client, model=model, messages=messages, temperature=0, **extra)
    assert text.encode() == reply.choices[0].message.content.encode()
    assert finish == reply.choices[0].finish_reason
    assert "\ufffd" not in text and text


@pytest.mark.parametrize(
    "stop,expected",
    [("テ", "日本語の"), ([" and", "zzz"], "日本語のテキスト🙂"), (["🙂"], "日本語のテキスト"), (["done.", "ü"], "日本語のテキスト🙂 and ")],
)
def test_stop_strings(client, stop, expected):
    reply = client.chat.completions.create(model="echo", messages=ECHO_MESSAGES, temperature=0, stop=stop)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert stream_text(client, model="echo", messages=ECHO_MESSAGES, temperature=0, stop=stop) == (expected, "stop")


def test_max_tokens_and_max_completion_tokens(client):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=7, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3  # the newer name wins
    text, finish = stream_text(client, model="tiny", messages=HI, max_completion_tokens=4)
    assert finish == "length"
    # a max_tokens beyond the context is clamped to what fits: tiny's context is 1024
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10**6, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == 1024


def test_tolerant_inputs(client):
    """Nulls mean the default, unknown fields are ignored, developer = system, text parts are joined."""
    reply = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": [{"type": "text", "text": ECHO_PROMPT}], "name": "me"}],
        temperature=0,
        extra_body={"top_p": None, "frequency_penalty": None, "stop": None, "n": 1, "user": "u1", "whatever": {"x": 1}},
    )
    assert reply.choices[0].message.content == ECHO_REPLY
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": None}, *HI],
        max_tokens=3,
        seed=7,
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert reply.usage.completion_tokens == 3


def test_seed_makes_sampling_reproducible(client):
    texts = [client.chat.completions.create(model="tiny", messages=HI, max_tokens=20, seed=42).choices[0].message.content for _ in range(2)]
    assert texts[0] == texts[1]


# --- errors


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": HI}, "model"),
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
        # OpenAI's answer to a message without content: 400 naming the field, not a reply
        ({"model": "tiny", "messages": [*HI, {"role": "assistant", "content": "Hi!"}, {"role": "user"}]}, "messages[2].content"),
        ({"model": "tiny", "messages": [{"role": "system", "content": None}, *HI]}, "messages[0].content"),
        ({"model": "tiny", "messages": [*HI, {"role": "assistant", "content": "Hi!"}]}, "messages"),
        ({"model": "tiny", "messages": HI, "temperature": 3}, "temperature"),
        ({"model": "tiny", "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": HI, "top_p": 1.5}, "top_p"),
        ({"model": "tiny", "messages": HI, "presence_penalty": -3}, "presence_penalty"),
        ({"model": "tiny", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": HI, "max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"model": "tiny", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny", "messages": HI, "stop": 3}, "stop"),
        ({"model": "tiny", "messages": HI, "n": 9}, "n"),
        ({"model": "tiny", "messages": HI, "logprobs": "yes"}, "logprobs"),
        ({"model": "tiny", "messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "tiny", "messages": HI, "tool_choice": "required"}, "tool_choice"),
        ({"model": "tiny", "messages": HI, "stream": "yes"}, "stream"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": None, "messages": None} | body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_bad_json_body(server, body):
    status, headers, data = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(data)["error"]["type"] == "invalid_request_error"


def test_context_length_exceeded_before_any_streaming(client):
    long_prompt = [{"role": "user", "content": "word " * 200}]  # echo's context is 64 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="echo", messages=long_prompt, stream=stream)
        assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"
    # a prompt far too long for any context is the same error, not 413
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "日本" * 100_000}])
    assert e.value.code == "context_length_exceeded"


def test_body_too_large_is_413_json(server):
    status, headers, body = raw(server, "POST", "/v1/chat/completions", b"x" * (2 << 20))
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_auth(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    for headers in [{}, {"Authorization": "sk-test-1"}, {"Authorization": "Bearer "}]:
        status, _, body = raw(server, "GET", "/v1/models", headers=headers, key=None)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, headers, _ = raw(server, "POST", "/v1/chat/completions", chat_body(stream=True), key=None)
    assert status == 401 and headers["access-control-allow-origin"] == "*"
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-1", max_retries=0).models.list().data
    assert raw(server, "GET", "/health", key=None)[0] == 200  # for load balancers: no key


def test_unknown_model_route_and_method(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=HI)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)]:
        got, headers, body = raw(server, method, path)
        assert got == status and headers["content-type"] == "application/json"
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_cors(server):
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count, x-stainless-timeout"
    status, headers, _ = raw(
        server,
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": "http://lobe.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked},
        key=None,
    )
    assert status in (200, 204)
    assert headers["access-control-allow-origin"] in ("*", "http://lobe.example")
    assert headers["access-control-allow-headers"] == asked
    assert set(headers["access-control-allow-methods"].replace(" ", "").split(",")) >= {"GET", "POST", "OPTIONS"}
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat_body(model="nope")), ("GET", "/v1/x", None)]:
        assert raw(server, method, path, body, {"Origin": "http://lobe.example"})[1]["access-control-allow-origin"] == "*"


def test_failed_step_reaches_the_stream_and_the_next_request_is_served(server, client):
    # NaN weights: sampling (temperature 1) raises inside the engine thread
    with pytest.raises(openai.APIError) as e:
        stream_text(client, model="broken", messages=HI, max_tokens=5)
    assert "probability tensor" in str(e.value.message)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="broken", messages=HI, max_tokens=5)
    assert e.value.body["type"] == "server_error"
    # the same scheduler serves on (greedy decoding never samples), and so does every other model
    assert client.chat.completions.create(model="broken", messages=HI, max_tokens=3, temperature=0).usage.completion_tokens == 3
    assert client.chat.completions.create(model="echo", messages=ECHO_MESSAGES, temperature=0).choices[0].message.content == ECHO_REPLY
    assert server.figures("broken")["finished"]["error"] == 2


# --- /v1/completions: a raw prompt continued, for base models


def tiny_model(server):
    """The model the server serves as "tiny", loaded here."""
    return model_from_checkpoint(load_checkpoint(latest_checkpoint(server.models / "tiny"))).eval()


def test_text_completion_continues_the_raw_prompt(server, client):
    prompt = "The history of the lighthouse"
    expected = "".join(generate(tiny_model(server), encode(prompt), SamplingParams(temperature=0, max_tokens=12)))  # no template
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].index == 0 and reply.choices[0].logprobs is None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(encode(prompt)), 12)
    # the same prompt as token ids, or as an array of one string
    assert client.completions.create(model="tiny", prompt=encode(prompt), max_tokens=12, temperature=0).choices[0].text == expected
    assert client.completions.create(model="tiny", prompt=[prompt], max_tokens=12, temperature=0).choices[0].text == expected
    # streamed: the same text, then the finish reason, the usage and [DONE]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # echo puts the prompt first; with max_tokens 0 it is all there is
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected
    only = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt + expected
    # a seed makes a sampled completion reproducible; stop strings end it
    a, b = (client.completions.create(model="tiny", prompt=prompt, max_tokens=12, seed=7, temperature=1).choices[0].text
            for _ in range(2))
    assert a == b
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[expected[3:6]])
    assert cut.choices[0].text == expected[: expected.index(expected[3:6])] and cut.choices[0].finish_reason == "stop"


def test_text_completion_refuses_what_it_cannot_do(client):
    for kwargs, param in [({"suffix": "end"}, "suffix"), ({"prompt": ["again"] * 33}, "prompt"), ({"prompt": []}, "prompt"),
                          ({"prompt": [50257]}, "prompt"), ({"n": 9}, "n"), ({"logprobs": 6}, "logprobs"),
                          ({"max_tokens": -1}, "max_tokens"), ({"prompt": "lorem " * 1100}, "prompt")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**({"model": "tiny", "prompt": "Hello"} | kwargs))
        assert e.value.body["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hello")


def test_echo_with_logprobs_scores_every_prompt_token_as_a_forward_pass_does(server, client):
    prompt = encode("Paris is the capital of France, and the Seine runs through it.")
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    scored = reply.choices[0].logprobs
    with torch.no_grad():
        expected = tiny_model(server)(torch.tensor([prompt]))[0][0, :-1, :VOCAB_SIZE].log_softmax(-1)
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    assert scored.token_logprobs[1:] == pytest.approx([expected[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4)
    assert "".join(scored.tokens) == reply.choices[0].text and scored.text_offset[1] == len(scored.tokens[0])
    assert reply.usage.completion_tokens == 0


def test_summed_logprobs_of_an_ending_are_hellaswags_loss(server, client):
    """How lm-evaluation-harness's local-completions backend scores a choice: the prompt's logprobs."""
    example = Example(0, "A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.",
                      "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing."], 3)
    expected = score(tiny_model(server), [example], torch.device("cpu"))[0]["losses_sum"]
    context = encode(example.ctx)
    for ending, loss in zip(example.endings, expected):
        tokens = encode(" " + ending)
        reply = client.completions.create(model="tiny", prompt=context + tokens, max_tokens=0, echo=True, logprobs=0)
        assert -sum(reply.choices[0].logprobs.token_logprobs[-len(tokens):]) == pytest.approx(loss, rel=1e-4)


def test_lm_evaluation_harness_local_completions_requests_score_as_hellaswag_does(server, client):
    """The request lm-evaluation-harness's local-completions model sends for loglikelihood (0.4.13,
    openai_completions.py: a batch of token-id prompts, max_tokens 1, logprobs 1, echo, temperature
    0) and its parsing (the sum of token_logprobs[ctxlen:-1]: the continuation, without the one
    generated token) give eval/hellaswag.py's per-ending loss. The harness itself is not installed
    here (README, Serving)."""
    example = Example(0, "A woman is outside with a bucket and a dog. The dog", ["runs around trying to avoid a bath.",
                      "gets into a bath tub with the dog.", "gets the dog wet, then it runs away again.",
                      "gets into the bath tub with the dog."], 0)
    expected = score(tiny_model(server), [example], torch.device("cpu"))[0]["losses_sum"]
    context = encode(example.ctx)
    endings = [encode(" " + e) for e in example.endings]
    reply = client.completions.create(model="tiny", prompt=[context + e for e in endings], max_tokens=1, logprobs=1,
                                      echo=True, temperature=0, seed=1234)
    for choice, ending, loss in zip(sorted(reply.choices, key=lambda c: c.index), endings, expected):
        token_logprobs = choice.logprobs.token_logprobs
        assert len(token_logprobs) == len(context) + len(ending) + 1  # the prompt, then the one generated token
        assert -sum(token_logprobs[len(context) : -1]) == pytest.approx(loss, rel=1e-4)
        tops = choice.logprobs.top_logprobs[len(context) : -1]
        assert all(len(top) == 1 for top in tops)  # is_greedy compares each token with max(top.values())


def test_chat_logprobs_streamed_or_not(client):
    kwargs = {"model": "tiny", "messages": HI, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and "".join(c.token for c in content) == reply.choices[0].message.content
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy: the likeliest
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token
    streamed = [e for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices
                and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).choices[0].logprobs is None
    for bad, param in [({"top_logprobs": 21}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**(kwargs | bad))
        assert e.value.body["param"] == param


def test_n_choices_decode_together(client):
    """n choices: with a seed, choice i is what a lone request seeded seed + i gives; greedy, all n
    are the lone answer; streamed, each choice's chunks carry its index and add up to its text."""
    ask = {"model": "tiny", "messages": HI, "max_tokens": 12}
    reply = client.chat.completions.create(**ask, n=3, seed=5, temperature=1)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(**ask, seed=5 + i, temperature=1).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in reply.choices] == alone and len(set(alone)) > 1
    assert reply.usage.completion_tokens == 3 * 12 and reply.usage.prompt_tokens == len(prompt_tokens(chat_turns(HI)))
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    assert [c.message.content for c in client.chat.completions.create(**ask, n=3, temperature=0).choices] == [greedy] * 3
    texts, finished = ["", "", ""], {}
    for chunk in client.chat.completions.create(**ask, n=3, temperature=0, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == 36
    assert texts == [greedy] * 3 and finished == {0: "length", 1: "length", 2: "length"}
    # the same for text completions
    base = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0).choices[0].text
    two = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, n=2, echo=True)
    assert [(c.index, c.text) for c in two.choices] == [(0, "Once upon" + base), (1, "Once upon" + base)]
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, n=2, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [base, base]
    # several prompts: choice j * n + i is the i-th of prompt j
    prompts = ["Once upon", "In the beginning", "Hello"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [(c.index, c.text) for c in batch.choices] == [(k, alone[k // 2]) for k in range(6)]
    assert batch.usage.prompt_tokens == sum(len(encode(p)) for p in prompts) and batch.usage.completion_tokens == 36
    streamed = [""] * 3
    for chunk in client.completions.create(model="tiny", prompt=[encode(p) for p in prompts], max_tokens=6, temperature=0,
                                           stream=True, echo=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [p + a for p, a in zip(prompts, alone)]


# --- under load


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}), {"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def read_event(resp) -> object:
    """The next event's data (skipping keepalive comments), or None at the end."""
    while True:
        line = resp.readline()
        if not line:
            return None
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: ") :]
            return data if data == "[DONE]" else json.loads(data)


def test_twenty_concurrent_streams_interleave_and_health_answers(server):
    n, first_content, ended, texts, health = 20, {}, {}, {}, []

    def stream(i):
        conn, resp = open_stream(server, {"model": "tiny", "messages": [{"role": "user", "content": f"Stream {i}"}], "max_tokens": 200, "temperature": 0})
        parts = []
        while (event := read_event(resp)) not in (None, "[DONE]"):
            content = event["choices"][0]["delta"].get("content")
            if content and i not in first_content:
                first_content[i] = time.monotonic()
            parts.append(content or "")
        ended[i] = time.monotonic() if event == "[DONE]" else None
        texts[i] = "".join(parts)
        conn.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        status, body = server.get("/health")
        health.append((status, body["models"].get("tiny", {}).get("state"), server.figures("tiny")["running"]))
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(ended) == n and all(ended.values()), "every stream ends with [DONE]"
    assert max(first_content.values()) < min(ended.values()), "every stream had text before any ended"
    assert all(status == 200 and state in (None, "loading", "ready") for status, state, _ in health)
    assert max(running for _, _, running in health) > 1
    assert server.figures("tiny")["batched_steps"] > 0  # decoded in batches, not one by one
    # batched output equals each prompt alone
    for i in (0, 7, 19):
        alone = json.loads(raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": f"Stream {i}"}], "max_tokens": 200, "temperature": 0})[2])
        assert alone["choices"][0]["message"]["content"] == texts[i]


def wait_figures(server, model: str, cond, what: str, guard: float = 10.0) -> dict:
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        f = server.figures(model)
        if cond(f):
            return f
        time.sleep(0.05)
    raise AssertionError(f"{what}: /metrics still says {server.figures(model)}")


def close_hard(conn: http.client.HTTPConnection) -> None:
    """Close with SO_LINGER 0: the server sees a reset, as when a browser tab is killed."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_disconnect_frees_the_row(server, client):
    before = server.figures("tiny")
    conn, resp = open_stream(server, {"model": "tiny", "messages": HI, "max_tokens": 1000})
    for _ in range(3):
        assert read_event(resp) is not None
    close_hard(conn)
    after = wait_figures(server, "tiny", lambda f: f["running"] == 0 and f["finished"]["cancelled"] > before["finished"]["cancelled"],
                         "the row was not freed")
    assert after["finished"]["length"] == before["finished"]["length"]  # stopped early, never ran to max_tokens
    assert after["tokens"] - before["tokens"] < 1000
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).usage.completion_tokens == 2


def test_long_stream_outlives_the_heartbeat_timeout(server):
    worker_pid_before = [line for line in server.log_text().splitlines() if "Booting worker" in line]
    start = time.monotonic()
    conn, resp = open_stream(server, {"model": "wide", "messages": HI, "max_tokens": 1000, "temperature": 0})
    events = []
    while (event := read_event(resp)) not in (None, "[DONE]"):
        events.append(event)
    conn.close()
    assert event == "[DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - start > 2, "the stream must outlast --timeout 2 to show anything"
    log = server.log_text()
    assert "WORKER TIMEOUT" not in log
    assert [line for line in log.splitlines() if "Booting worker" in line] == worker_pid_before


def test_long_prompts_under_load_leave_the_hub_free(server):
    """8 streams with ~500-token prompts (prefill is the longest torch work), then the whole module's
    log is checked: gevent's monitor printed no 'appears to be blocked'."""
    prompt = [{"role": "user", "content": "lorem ipsum dolor " * 160}]
    threads = [threading.Thread(target=lambda: raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": prompt, "max_tokens": 32, "stream": True})) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = server.log_text()
    assert "appears to be blocked" not in log, log[-5000:]
    # the only tracebacks are the NaN model's, from test_failed_step_reaches_the_stream...
    assert log.count("Traceback") == log.count("generation step failed"), log[-5000:]


# --- admission: a queue with a bound


def test_queue_bound_and_queued_disconnect(tmp_path):
    models = tmp_path / "models"
    write_model(models, "tiny", TINY)
    env = {"NANOGPT_MAX_ROWS": "1", "NANOGPT_MAX_WAITING": "1", "NANOGPT_KEEPALIVE": "0.2"}
    with gunicorn_server(models, tmp_path / "gunicorn.log", env) as server:
        long = {"model": "tiny", "messages": HI, "max_tokens": 1000}
        running, running_resp = open_stream(server, long)
        assert read_event(running_resp) is not None
        queued, queued_resp = open_stream(server, long)  # headers and the role chunk come at once
        wait_figures(server, "tiny", lambda f: f["waiting"] == 1, "the second request should wait")
        status, headers, body = raw(server, "POST", "/v1/chat/completions", long, key=None)
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["type"] == "server_error"
        assert server.figures("tiny")["rejected"] == 1
        close_hard(queued)  # noticed at the next keepalive write
        wait_figures(server, "tiny", lambda f: f["waiting"] == 0 and f["finished"]["cancelled"] == 1, "the queued request was not dropped")
        assert server.figures("tiny")["running"] == 1
        close_hard(running)
        wait_figures(server, "tiny", lambda f: f["running"] == 0, "the running request was not freed")
        status, _, body = raw(server, "POST", "/v1/chat/completions", long | {"max_tokens": 2}, key=None)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
