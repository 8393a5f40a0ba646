"""The OpenAI-compatible server: /v1/models, /v1/chat/completions and /v1/completions (streaming or
not), /health, /metrics (Prometheus, web/metrics.py) and the chat page at /.

    gunicorn -c gunicorn_config.py web.app:app                 # what users run (gevent workers)
    NANOGPT_API_KEYS=sk-local-1 gunicorn -c gunicorn_config.py web.app:app
    NANOGPT_QUANT=int8 gunicorn -c gunicorn_config.py web.app:app   # int8 weights: faster decoding on CPU

The wire format follows ../shared/openai_contract.md point by point; how PyTorch runs inside a
gevent worker is web/scheduler.py's job (../shared/SERVING.md). A request greenlet only validates,
renders the prompt, tokenizes, queues the request and turns token ids into text and SSE events;
every torch call happens in the model's engine thread.

Settings come from the environment (ServerConfig.from_env); tests build apps with create_app().
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import gevent
import gevent.queue
from flask import Flask, Response, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from model.cli import QUANT_TYPES
from model.engine import DEFAULT_TEMPERATURE, SamplingParams
from model.int8_linear import KERNEL_ROWS
from model.prompt import MAX_TOKEN_BYTES, fit_turns, history_budget, prompt_tokens
from model.text_stream import TextStream
from model.tokenizer import get_tokenizer
from web.chat_request import APIError, parse_body, parse_chat_request, parse_text_request
from web.logprobs import Scored, chat_logprobs, text_logprobs
from web.metrics import ServerMetrics
from web.registry import ModelRegistry, default_device
from web.scheduler import KEEPALIVE, EngineError, Overloaded, Request, Scheduler

log = logging.getLogger("gunicorn.error")  # under gunicorn: its error log; elsewhere warnings reach stderr


@dataclass(frozen=True)
class ServerConfig:
    """What an operator can set; from_env() reads each from NANOGPT_<NAME upper-cased>."""

    models_dir: str = "checkpoints"  # every run directory with a checkpoint in it is a model
    api_keys: tuple[str, ...] = ()  # accepted Bearer keys; none = no authentication
    max_rows: int = 16  # requests decoded together per model (KV cache rows)
    max_waiting: int = 64  # requests queued per model before 503 + Retry-After
    max_models: int = 2  # models loaded at once in a worker
    keepalive: float = 5.0  # seconds between ": keepalive" comments on a stream with no new text
    max_body_bytes: int = 1 << 20  # larger than any prompt that fits a 1024-token context, JSON-escaped
    torch_threads: int = 0  # per engine thread; 0 = OMP_NUM_THREADS, else every core
    device: str = ""  # "" = cuda if present, else cpu
    quant: str = "none"  # "int8": per-channel int8 weights on CPU, decoding ~2x faster (GPT.prepare_inference)
    # a conversation longer than the context: False = 400 context_length_exceeded (OpenAI's answer);
    # True = its oldest turns are left out until it fits with room for the answer, as in tuning
    drop_old_turns: bool = False
    metrics: bool = True  # GET /metrics and the figures behind it; off only to measure what they cost
    # /metrics asks for the key like /v1/ when keys are set; True lets a scraper on a private network in without one
    metrics_public: bool = False

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ServerConfig:
        environ = os.environ if environ is None else environ
        values = {}
        for name, default in vars(cls()).items():
            raw = environ.get(f"NANOGPT_{name.upper()}")
            if raw is None:
                continue
            if name == "api_keys":
                values[name] = tuple(k.strip() for k in raw.split(",") if k.strip())
            elif isinstance(default, bool):
                if raw.strip().lower() not in ("0", "1", "true", "false", "yes", "no", ""):
                    raise ValueError(f"NANOGPT_{name.upper()}={raw!r}: expected 1 or 0 (or true, false, yes, no)")
                values[name] = raw.strip().lower() in ("1", "true", "yes")
            else:
                values[name] = type(default)(raw)
        return cls(**values)


def create_app(config: ServerConfig | None = None) -> Flask:
    """The Flask app with its own model registry (one per gunicorn worker: built after fork)."""
    config = config or ServerConfig.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.url_map.merge_slashes = False  # an API answers, it does not redirect ("//v1" is a 404)
    threads = config.torch_threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    # this worker's number among the live ones, set by gunicorn_config.py's post_fork: its GPU
    gpu_slot = int(os.environ.get("NANOGPT_WORKER_SLOT", "0"))
    if config.quant not in QUANT_TYPES:
        raise ValueError(f"NANOGPT_QUANT={config.quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    if config.quant == "int8" and not (config.device or default_device(gpu_slot)).startswith("cpu"):
        raise ValueError("NANOGPT_QUANT=int8 is for decoding on CPU: unset it on a GPU, or set NANOGPT_DEVICE=cpu")
    if config.quant == "int8" and config.max_rows > KERNEL_ROWS:
        # above it a step's products take the dequantizing path: a request's answer would depend on its neighbours
        raise ValueError(f"NANOGPT_MAX_ROWS={config.max_rows} with NANOGPT_QUANT=int8: at most {KERNEL_ROWS}")
    metrics = ServerMetrics(enabled=config.metrics)
    registry = ModelRegistry(
        config.models_dir, config.max_models, config.max_rows, config.max_waiting, threads, config.device or None,
        gpu_slot, metrics, config.quant,
    )
    app.extensions["nanogpt_registry"] = registry
    log.info("%s", registry.describe())
    get_tokenizer()  # built now, at worker start: building it later would stall the hub for a moment
    if config.api_keys:
        log.info("API keys required: %d key(s) from NANOGPT_API_KEYS", len(config.api_keys))
    else:
        log.warning("NANOGPT_API_KEYS is not set: the API is open to anyone who can reach this address")

    # --- authentication and CORS (browsers: LobeChat's client mode, openai-js)

    @app.before_request
    def preflight_and_auth():
        g.started = time.monotonic()
        if request.method == "OPTIONS":  # a preflight never carries credentials
            response = app.response_class(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = "86400"
            return response
        private = request.path.startswith("/v1/") or (request.path == "/metrics" and not config.metrics_public)
        if config.api_keys and private:
            header = request.headers.get("Authorization", "")
            key = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
                what = "Incorrect API key provided" if key else "Missing API key: send 'Authorization: Bearer <key>' (chat page: the API key field)"
                raise APIError(401, what, code="invalid_api_key")
        return None

    @app.after_request
    def cors_and_count(response: Response) -> Response:
        response.headers["Access-Control-Allow-Origin"] = "*"  # also on errors and streams
        # routes, not paths: a client's made-up URLs must not each become a time series
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.request(endpoint, g.get("model", ""), response.status_code)
        return response

    # --- errors: always OpenAI's JSON object, never an HTML page

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        return jsonify(e.body()), e.status, e.headers

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        messages = {
            404: f"Unknown request URL: {request.method} {request.path}",
            405: f"Method {request.method} is not allowed for {request.path}",
            413: f"The request body is larger than {config.max_body_bytes} bytes",
        }
        return api_error(APIError(e.code or 500, messages.get(e.code, e.description)))

    @app.errorhandler(Exception)
    def server_error(e: Exception):
        log.exception("error handling %s %s", request.method, request.path)
        return api_error(APIError(500, f"The server had an error processing your request: {type(e).__name__}: {e}"))

    # --- endpoints

    @app.get("/")
    def chat_page():
        return render_template("index.html", temperature=DEFAULT_TEMPERATURE)

    @app.get("/health")
    def health():
        # no key needed, so only what a load balancer needs: each loaded model's state (the figures are in /metrics)
        models = registry.states()
        dead = [m for m, state in models.items() if state == "dead"]
        body = {"status": "dead" if dead else "ok", "models": {m: {"state": state} for m, state in models.items()}}
        return jsonify(body), 503 if dead else 200

    @app.get("/metrics")
    def prometheus_metrics():
        if not config.metrics:
            raise APIError(404, "Metrics are off on this server (NANOGPT_METRICS=0)")
        text, content_type = metrics.exposition()
        return Response(text, content_type=content_type)

    @app.get("/v1/models")
    def list_models():
        return jsonify({"object": "list", "data": [model_object(m, registry.kind(m)) for m in registry.list()]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        info = registry.find(model_id)
        if info is None:
            raise model_not_found(model_id)
        return jsonify(model_object(info, registry.kind(info)))

    def loaded_scheduler(model: str) -> Scheduler:
        """The scheduler of a served model, loaded (waiting for it if another request is loading it)."""
        info = registry.find(model)
        if info is None:
            raise model_not_found(model)
        g.model = model
        try:
            scheduler = registry.scheduler(info)
            scheduler.loaded.get()
        except Overloaded as e:
            metrics.rejection(model)
            raise overloaded(e) from None
        except Exception as e:
            raise APIError(500, f"Model {model!r} could not be loaded from {info.checkpoint}: {e}") from None
        return scheduler

    def submit(scheduler: Scheduler, model: str, prompt: list[int], params: SamplingParams, text: bool,
               first_index: int = 0, echo: str = "") -> list[Completion]:
        """Queue a prompt; a Completion per choice (n), indexed from first_index, whose costs the access
        log reads. echo: the text a text completion's choices start with."""
        if params.n > scheduler.max_rows:
            raise APIError(400, f"'n' can be at most {scheduler.max_rows} here (NANOGPT_MAX_ROWS: each choice takes a "
                           "row of the batch)", param="n")
        try:
            req = scheduler.submit(prompt, params)
        except Overloaded as e:
            metrics.rejection(model)
            raise overloaded(e) from None
        except EngineError as e:
            raise APIError(500, str(e)) from None
        if "response" not in g:  # every choice of every prompt of the request: one id, one creation time
            g.response = (f"{'cmpl' if text else 'chatcmpl'}-{uuid.uuid4().hex}", int(time.time()))
        completions = [Completion(r, model, params.stop, g.started, metrics, g.response, text, first_index + i, echo)
                       for i, r in enumerate(req.choices)]
        # for the access log (web/access_log.py): every choice of every prompt of the request
        request.environ.setdefault("nanogpt.completion", []).extend(c.cost for c in completions)
        return completions

    def collect(completions: list[Completion]) -> list[str]:
        """The whole text of each choice of a response that is not streamed."""
        try:
            return ["".join(d for d in c.deltas(config.keepalive) if d is not KEEPALIVE) for c in completions]
        except EngineError as e:
            raise APIError(500, f"Generation failed: {e}") from None
        finally:
            for c in completions:
                c.end()

    @app.post("/v1/completions")
    def text_completions():
        """A raw prompt continued, no template: how a base model is sampled (OpenAI's legacy schema)."""
        body = parse_text_request(parse_body(request.get_data(cache=False)))
        scheduler = loaded_scheduler(body.model)
        context = scheduler.context_length
        for prompt in body.prompts:  # all checked before any is queued
            if len(prompt) >= context:
                raise context_exceeded(context, str(len(prompt)), param="prompt")
        n, echoes = body.params.n, [text if body.echo else "" for text in body.prompt_texts]
        prompt_total = sum(map(len, body.prompts))
        if body.max_tokens == 0 and not body.params.prompt_logprobs:  # nothing to generate or score: the prompts alone
            choices = [text_choice(j * n + i, echo, "length", None) for j, echo in enumerate(echoes) for i in range(n)]
            return jsonify(text_completion_body(f"cmpl-{uuid.uuid4().hex}", body.model, choices, usage([], prompt_total)))
        completions: list[Completion] = []
        try:  # choice j * n + i: the i-th of prompt j, as OpenAI numbers them
            for j, (prompt, echo) in enumerate(zip(body.prompts, echoes)):
                params = replace(body.params, max_tokens=min(body.max_tokens, context - len(prompt)))
                completions += submit(scheduler, body.model, prompt, params, True, j * n, echo)
        except APIError:  # a full queue part way: the prompts queued so far are not wanted either
            for c in completions:
                c.end()
            raise
        if body.stream:
            return stream_response(completions, body.include_usage, config.keepalive, prompt_total)
        texts = collect(completions)
        choices = [text_choice(c.index, c.echo + text, c.finish_reason, c.logprobs(c.echo_scored() + c.scored))
                   for c, text in zip(completions, texts)]
        first = completions[0]
        return jsonify(text_completion_body(first.id, body.model, choices, usage(completions, prompt_total), first.created))

    @app.post("/v1/chat/completions")
    def chat_completions():
        chat = parse_chat_request(parse_body(request.get_data(cache=False)))
        scheduler = loaded_scheduler(chat.model)

        context = scheduler.context_length
        if chat.turns[-1].text_bytes() > context * MAX_TOKEN_BYTES:  # cannot fit: spare the hub the encoding
            raise context_exceeded(context, f"more than {context}")
        # without drop_old_turns the whole conversation must fit, with room for one token
        turns, dropped = fit_turns(chat.turns, history_budget(context, chat.max_tokens) if config.drop_old_turns else context - 1)
        if dropped and not config.drop_old_turns:
            raise context_exceeded(context, f"at least {context}")
        prompt = prompt_tokens(turns)
        if len(prompt) >= context:
            raise context_exceeded(context, str(len(prompt)))
        if dropped:
            log.info("%s: left out the oldest %d of %d turns to fit the %d-token context", chat.model, dropped,
                     len(chat.turns), context)
        room = context - len(prompt)  # a larger max_tokens is clamped: finish_reason "length" says so
        params = replace(chat.params, max_tokens=min(chat.max_tokens or room, room))
        completions = submit(scheduler, chat.model, prompt, params, text=False)
        if chat.stream:
            return stream_response(completions, chat.include_usage, config.keepalive, len(prompt))
        texts = collect(completions)
        first = completions[0]
        return jsonify(
            {
                "id": first.id,
                "object": "chat.completion",
                "created": first.created,
                "model": chat.model,
                "choices": [
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": c.logprobs(c.scored),
                        "finish_reason": c.finish_reason,
                    }
                    for c, text in zip(completions, texts)
                ],
                "usage": usage(completions, len(prompt)),
            }
        )

    return app


class Completion:
    """One response's text: token ids from the engine through UTF-8 and stop-string handling, and
    what it cost.

    Streaming and non-streaming responses both read deltas() here, so their text, finish reason
    and usage are the same by construction. end() frees the request's row and reports the cost
    once: to the metrics, and in `cost`, the fields of its access log line."""

    def __init__(self, req: Request, model: str, stop: tuple[str, ...], started: float, metrics: ServerMetrics,
                 response: tuple[str, int], text: bool = False, index: int = 0, echo: str = ""):
        """response: the (id, created) every choice of the response carries. text: a /v1/completions
        response (text_completion objects), else a chat completion. index: which choice of the
        response. echo: the prompt text a text completion's choice starts with."""
        self.req, self.model, self.started, self.metrics, self.text_mode = req, model, started, metrics, text
        self.index, self.echo = index, echo
        self.id, self.created = response
        self.text = TextStream(stop)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.ttft: float | None = None
        self.cost = {"model": model, "prompt_tokens": len(req.prompt), "completion_tokens": 0, "ttft_s": None,
                     "finish_reason": None}
        self.scored: list[Scored] = []  # tokens read so far with their log-probabilities, if asked for
        self.sent = 0  # of them, how many a streamed chunk carried
        self.offset = 0  # where the next scored token starts in a text completion's text (text_offset)

    def deltas(self, keepalive: float) -> Iterator[str | object]:
        """Text deltas (never a broken character or part of a stop string), and KEEPALIVE when idle."""
        for item in self.req.tokens(keepalive):
            if item is KEEPALIVE:
                yield item
                continue
            if self.ttft is None:
                self.ttft = self.cost["ttft_s"] = round(time.monotonic() - self.started, 4)
            self.completion_tokens += 1
            self.cost["completion_tokens"] = self.completion_tokens
            if self.req.params.logprobs is not None:
                self.scored.append((item, self.req.seq.logprobs[len(self.scored)]))
            if delta := self.text.push(item):
                yield delta
            if self.text.stopped:  # a stop string: the rest is not wanted, free the row now
                self.req.cancel()
                self.finish_reason = "stop"
                return
        if rest := self.text.flush():
            yield rest
        self.finish_reason = self.req.finish_reason
        self.completion_tokens = self.req.completion_tokens  # counts a closing <|endoftext|> too

    def end(self) -> None:
        """Free the row (a no-op once the engine has finished it) and report the cost, once: finish
        reason "cancelled" if the text was not read to its end (the client left), "error" if a step
        failed."""
        self.req.cancel()
        if self.cost["finish_reason"] is not None:
            return
        reason = "error" if self.req.error is not None else self.finish_reason or "cancelled"
        self.cost.update(finish_reason=reason, completion_tokens=self.completion_tokens)
        self.metrics.completion(self.model, len(self.req.prompt), self.completion_tokens, self.ttft,
                                time.monotonic() - self.started, reason)


    def echo_scored(self) -> list[Scored]:
        """The prompt's tokens with their log-probabilities, where the request asked for echo and logprobs."""
        return list(zip(self.req.prompt, self.req.seq.prompt_logprobs)) if self.req.params.prompt_logprobs else []

    def logprobs(self, scored: list[Scored]) -> dict | None:
        """These tokens' `logprobs` object, chat or legacy (None when the request asked for none)."""
        if self.req.params.logprobs is None:
            return None
        if not self.text_mode:
            return chat_logprobs(scored)
        figures = text_logprobs(scored, self.offset)
        self.offset = figures["text_offset"][-1] + len(figures["tokens"][-1]) if scored else self.offset
        return figures

    def unsent(self) -> list[Scored]:
        """The scored tokens no streamed chunk has carried yet."""
        scored, self.sent = self.scored[self.sent :], len(self.scored)
        return scored

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              scored: list[Scored] = ()) -> dict:
        """One streamed event: a chat delta ({"role"} and/or {"content"}) or a text completion's text,
        with the log-probabilities of the tokens it carries."""
        logprobs = self.logprobs(list(scored)) if scored else None
        if self.text_mode:
            choice = text_choice(self.index, text or "", finish_reason, logprobs)
            return text_completion_body(self.id, self.model, [choice], None, self.created)
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }


def usage(completions: list[Completion], prompt_tokens: int) -> dict:
    """A response's usage: the prompt once (its choices share it), the tokens of every choice."""
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion_body(id: str, model: str, choices: list[dict], usage: dict | None, created: int | None = None) -> dict:
    """A text_completion object: a whole response, or one streamed event of one."""
    body = {"id": id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices}
    return body | ({"usage": usage} if usage is not None else {})


def stream_response(completions: list[Completion], include_usage: bool, keepalive: float, prompt_tokens: int) -> Response:
    """Server-sent events as OpenAI sends them: for each choice its role (chat) or its echoed prompt
    (text, if any), then content deltas of every choice as they come, each choice's finish, [usage],
    [DONE].

    Each choice is read in a greenlet of its own, all into one queue, so the n choices of a request
    stream together. A client that hangs up surfaces as GeneratorExit at the next write (a keepalive
    comment at the latest), and the finally clause frees every row; call_on_close covers a stream
    never started."""
    extra = {"usage": None} if include_usage else {}
    first = completions[0]

    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"  # ensure_ascii: one ASCII line whatever the text

    def read(completion: Completion, queue: gevent.queue.Queue) -> None:
        try:
            for delta in completion.deltas(keepalive):
                queue.put((completion, delta))
            queue.put((completion, None))  # this choice is done
        except EngineError as e:
            queue.put((completion, e))

    def events() -> Iterator[str]:
        queue: gevent.queue.Queue = gevent.queue.Queue()
        readers = [gevent.spawn(read, c, queue) for c in completions]
        echoed = {c for c in completions if not c.echo}  # the echoed prompt goes first, once its tokens are scored

        def echo_first(c: Completion) -> Iterator[str]:
            if c not in echoed:
                echoed.add(c)
                yield event(c.chunk(c.echo, scored=c.echo_scored()) | extra)

        try:
            for c in completions if not first.text_mode else ():
                yield event(c.chunk("", role=True) | extra)
            running = len(completions)
            while running:
                c, item = queue.get()
                if item is KEEPALIVE:
                    yield ": keepalive\n\n"
                elif isinstance(item, EngineError):  # headers are sent: the error goes in the stream, and it ends
                    yield event(APIError(500, f"Generation failed: {item}").body())
                    return
                elif item is None:
                    running -= 1
                    yield from echo_first(c)
                    yield event(c.chunk(None, c.finish_reason, scored=c.unsent()) | extra)
                else:
                    yield from echo_first(c)
                    yield event(c.chunk(item, scored=c.unsent()) | extra)
            if include_usage:
                yield event(first.chunk(None) | {"choices": [], "usage": usage(completions, prompt_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            gevent.killall(readers, block=False)
            end_all()

    def end_all() -> None:
        for c in completions:
            c.end()

    response = Response(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    response.call_on_close(end_all)
    return response


def model_object(info, kind: str | None) -> dict:
    """OpenAI's model object, and `kind`: the stage that wrote the checkpoint ("pretrain": a base model
    that continues text, "sft": instruction-tuned, "dpo": preference-tuned; null if it does not say).
    Clients ignore fields they do not know; the chat page picks a tuned model with it."""
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": "nanogpt-instruct", "kind": kind}


def model_not_found(model_id: str) -> APIError:
    return APIError(
        404,
        f"The model {model_id!r} does not exist: GET /v1/models lists the run directories being served",
        param="model",
        code="model_not_found",
    )


def context_exceeded(context: int, needed: str, param: str = "messages") -> APIError:
    """OpenAI's 400 for a chat's messages, or a text completion's prompt, longer than the context."""
    what = ("your messages need", "shorten them (earlier turns are left out for you only where the server sets "
            "NANOGPT_DROP_OLD_TURNS=1)") if param == "messages" else (f"your {param} needs", "shorten it")
    return APIError(400, f"This model's maximum context length is {context} tokens, and {what[0]} {needed}: {what[1]}",
                    param=param, code="context_length_exceeded")


def overloaded(e: Exception) -> APIError:
    return APIError(503, f"The server is overloaded ({e}): retry shortly", code="overloaded", headers={"Retry-After": "1"})


def __getattr__(name: str):
    """`web.app:app` for gunicorn, made on first use: importing this module (tests, create_app
    users) builds nothing."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
