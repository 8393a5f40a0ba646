"""One loaded model in a gevent worker: its engine, the native thread that runs it, and the
scheduler greenlet that batches every request for it (design: ../shared/SERVING.md, §3 and §6).

    request greenlets ──submit()──▶ waiting (FIFO) ──▶ scheduler greenlet ──pool.apply(step)──▶ engine thread
           ▲                                                 │
           └──────────── Request.tokens(): token ids ◀───────┘

Torch never runs on the gevent hub: a forward pass there would freeze every connection of the
worker, /health and gunicorn's heartbeat included. Every torch call goes through `self.pool`, a
gevent ThreadPool of one long-lived native thread that owns the model and its KV cache (one thread
also keeps torch's per-thread state, such as inference mode and the thread count, in one place).
Torch ops release the GIL, so the hub keeps serving while a step runs.

Everything else (the waiting queue, which request owns which sequence, cancellation flags) lives
on the hub thread only, so nothing needs a lock: the thread runs one step at a time, and the hub
reads what the step did after `pool.apply` returns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

import gevent
import gevent.event
import torch
from gevent.threadpool import ThreadPool

from model.engine import Engine, SamplingParams, Sequence
from model.gpt import GPT
from web.metrics import ServerMetrics

log = logging.getLogger("gunicorn.error")  # under gunicorn: its error log

KEEPALIVE = object()  # what Request.tokens() yields when no token came within its timeout


class Overloaded(Exception):
    """Too many requests are already waiting for this model: answer 503 with Retry-After."""


class EngineError(Exception):
    """A generation step failed; the message says why. The requests of that step are ended with it."""


class Request:
    """One completion as the request greenlet sees it: token ids arrive, a flag cancels it."""

    def __init__(self, scheduler: Scheduler, prompt: list[int], params: SamplingParams):
        self.scheduler, self.prompt, self.params = scheduler, prompt, params
        self.seq: Sequence | None = None  # set once the engine has started it
        self.finish_reason: str | None = None  # "stop" or "length", from the engine
        self.completion_tokens = 0  # tokens the engine generated for it (a closing <|endoftext|> included)
        self.error: str | None = None
        self.cancelled = False
        # the request's completions (SamplingParams.n): itself first; the others get their sequences when
        # the shared prompt is in (Scheduler._attach) and are never queued on their own
        self.choices: list[Request] = [self]
        self._pending: deque[int] = deque()
        self._delivered = 0  # tokens of seq.output already in _pending
        self._ready = gevent.event.Event()

    def tokens(self, timeout: float) -> Iterator[int | object]:
        """Token ids as they are generated, and KEEPALIVE after each `timeout` seconds without one
        (so a streaming view can write a comment and notice a client that left). Ends when the
        engine finishes the request; raises EngineError if its step failed."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self.error is not None:
                raise EngineError(self.error)
            if self.finish_reason is not None:
                return
            self._ready.clear()
            if not self._ready.wait(timeout):
                yield KEEPALIVE

    def cancel(self) -> None:
        """Stop generating (client gone, or a stop string matched): its row is freed before the next step."""
        if not self.cancelled and self.finish_reason is None and self.error is None:
            self.cancelled = True
            self.scheduler.wake()

    def _deliver(self) -> None:
        """Hand over what the last step generated (called by the scheduler after each step)."""
        seq = self.seq
        self._pending.extend(seq.output[self._delivered :])  # a closing <|endoftext|> is never in output
        self._delivered = len(seq.output)
        self.completion_tokens = seq.sampled
        self.finish_reason = seq.finish_reason
        self._ready.set()

    def _fail(self, message: str) -> None:
        self.error = message
        self._ready.set()


class Scheduler:
    """Continuous batching for one model: admit FIFO, prefill within a token budget, then one
    batched decode step for all active requests, over and over while there is work."""

    def __init__(
        self,
        load: Callable[[], GPT],
        max_rows: int = 16,
        max_waiting: int = 64,
        torch_threads: int | None = None,
        metrics: ServerMetrics | None = None,
        name: str = "",
    ):
        """`load` builds the model; it runs in the engine thread, like everything torch. The figures
        (load time, running and waiting requests, rows per step) go to metrics under the model's name."""
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.metrics, self.name = metrics or ServerMetrics(enabled=False), name
        self.pool = ThreadPool(1)
        self.engine: Engine | None = None
        self.waiting: deque[Request] = deque()
        self.active: dict[Sequence, Request] = {}
        self.admitting: list[Request] = []  # taken from waiting for the step that is running
        self.dead: str | None = None  # why the scheduler loop stopped, if it ever does
        self._wake = gevent.event.Event()
        self._load, self._torch_threads = load, torch_threads
        self.loaded = gevent.event.AsyncResult()  # the model (or the exception that loading raised)
        self._greenlet = gevent.spawn(self._run)

    # --- used by request greenlets (hub thread)

    @property
    def context_length(self) -> int:
        return self.engine.max_len

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises Overloaded when max_waiting requests are already queued."""
        if self.dead is not None:
            raise EngineError(f"the model's scheduler stopped: {self.dead}")
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests are already waiting for this model")
        req = Request(self, prompt, params)
        req.choices += [Request(self, prompt, params) for _ in range(params.n - 1)]
        self.waiting.append(req)
        self._report_queue()
        self.wake()
        return req

    def wake(self) -> None:
        self._wake.set()

    def busy(self) -> bool:
        """Loading, or requests running or waiting that are not cancelled: not to be evicted."""
        requests = [*self.waiting, *self.admitting, *self.active.values()]
        return not self.loaded.ready() or any(not r.cancelled for r in requests)

    @property
    def state(self) -> str:
        """loading, ready, failed (the checkpoint did not load) or dead (the loop stopped)."""
        if not self.loaded.ready():
            return "loading"
        if not self.loaded.successful():
            return "failed"
        return "dead" if self.dead else "ready"

    def close(self) -> None:
        """Stop the loop and the thread (the model cache evicts only idle schedulers)."""
        self._greenlet.kill(block=False)
        self.pool.kill()
        self.metrics.queue(self.name, 0, 0)

    def _report_queue(self) -> None:
        self.metrics.queue(self.name, len(self.active) + len(self.admitting), len(self.waiting))

    # --- the loop (a greenlet on the hub) and its steps (in the engine thread)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.engine = self.pool.apply(self._start_engine)
        except Exception as e:  # a bad checkpoint: every request for this model gets the reason
            self.metrics.model_load(self.name, time.monotonic() - started, ok=False)
            self.loaded.set_exception(e)
            self.dead = f"loading failed: {e}"
            return
        self.metrics.model_load(self.name, time.monotonic() - started, ok=True)
        self.loaded.set(self.engine.model)
        try:
            while True:
                self._step()
        except gevent.GreenletExit:
            raise
        except BaseException as e:  # a bug in the loop itself: fail everyone, /health reports it
            self.dead = f"{type(e).__name__}: {e}"
            for req in list(self.active.values()) + self.admitting + list(self.waiting):
                for choice in req.choices:
                    choice._fail(self.dead)
            raise

    def _start_engine(self) -> Engine:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)  # per thread: MKL ignores the main thread's setting
        return Engine(self._load(), max_rows=self.max_rows)

    def _step(self) -> None:
        cancelled = self._take_cancelled()
        if not (self.waiting or self.active or cancelled):
            self._wake.clear()  # no greenlet switch between the check above and this: no lost wake-up
            self._wake.wait()
            return
        # taken out of the queue for the step, so that they never count against max_waiting
        free = self.max_rows - len(self.active)
        self.admitting = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        self._report_queue()
        try:
            started = self.pool.apply(
                self._engine_step, (cancelled, [(r.prompt, r.params) for r in self.admitting])
            )
        except Exception as e:
            self._fail_all(self.admitting, f"{type(e).__name__}: {e}")
            return
        finally:
            admitted, self.admitting = self.admitting, []
        for req, seq in zip(admitted, started):
            req.seq = seq
            self.active[seq] = req
        self.waiting.extendleft(reversed(admitted[len(started) :]))  # no room this step: first in line again
        self._attach()
        if self.active:
            self.metrics.decode_step(self.name, len(self.active))
        for seq, req in list(self.active.items()):
            req._deliver()
            if req.finish_reason is not None:
                del self.active[seq]
        self._report_queue()

    def _attach(self) -> None:
        """Give each request's other completions the sequences the engine made once its prompt was in."""
        for seq, req in list(self.active.items()):
            for choice, sibling in zip(req.choices[1:], seq.siblings):
                if choice.seq is None:
                    choice.seq = sibling
                    self.active[sibling] = choice

    def _take_cancelled(self) -> list[Sequence]:
        """Forget cancelled requests; returns the sequences the engine must release."""
        gone = [req for req in self.waiting if req.cancelled]
        for req in gone:
            self.waiting.remove(req)
        cancelled = [seq for seq, req in self.active.items() if req.cancelled]
        for seq in cancelled:
            del self.active[seq]
        if gone or cancelled:
            self._report_queue()
        return cancelled

    @torch.inference_mode()
    def _engine_step(self, cancelled: list[Sequence], candidates: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
        """Release cancelled rows; start and prefill new requests within one chunk's worth of prompt
        tokens (a long prompt is fed over several steps, so the others keep streaming); then one
        decode step for every decoding row. Returns the sequences started, in candidates' order."""
        engine = self.engine
        for seq in cancelled:
            engine.release(seq)
        started: list[Sequence] = []
        budget = engine.prefill_chunk
        while budget > 0:
            if engine.prefilling is None:
                if len(started) == len(candidates) or not engine.has_room(candidates[len(started)][1].n):
                    break
                started.append(engine.start(*candidates[len(started)]))
            seq = engine.prefilling
            budget -= min(engine.prefill_chunk, len(seq.prompt) - seq.cached)
            engine.prefill_step()
        engine.decode_step()
        return started

    def _fail_all(self, admitting: list[Request], message: str) -> None:
        """A step raised: its requests end with the error, the engine is emptied, the loop goes on."""
        log.error("generation step failed, ending %d request(s): %s", len(self.active) + len(admitting), message)
        for req in list(self.active.values()) + admitting:
            for choice in req.choices:  # a request's other completions too, attached or not
                choice._fail(message)
        self.active.clear()
        self._report_queue()
        self.pool.apply(self._empty_engine)

    def _empty_engine(self) -> None:
        engine = self.engine
        for seq in list(engine.rows) + ([engine.prefilling] if engine.prefilling else []):
            engine.release(seq)
