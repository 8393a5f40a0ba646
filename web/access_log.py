"""gunicorn's access log as one JSON object per request, with what a completion cost.

gunicorn_config.py sets `logger_class` to AccessLogger, so the lines go wherever gunicorn's access
log goes (stdout by default; --access-logfile FILE). Every request gets one line:

    {"time": "2026-12-03T18:20:01.532Z", "remote": "127.0.0.1", "method": "POST",
     "path": "/v1/chat/completions", "status": 200, "duration_s": 0.412, "model": "tuned",
     "prompt_tokens": 31, "completion_tokens": 3, "ttft_s": 0.118, "finish_reason": "stop"}

The last five fields only on completion requests that reached a model (web/app.py puts each choice's
in the WSGI environ as `nanogpt.completion`). finish_reason: stop, length, error (generation failed)
or cancelled (the client left before the end). A request for n > 1 choices adds "n": its tokens are
all the choices', its time to first token the earliest, its finish reason the first choice's. Never logged: the prompt, the reply, any header (so
never the API key) and the query string.

This module runs in gunicorn's master too: it must not import torch or the app.
"""

from __future__ import annotations

import json
import time

from gunicorn import glogging


def access_line(environ: dict, status: int, duration_s: float, now: float | None = None) -> str:
    """The JSON line of one request: environ is the WSGI environ the app saw."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    record = {"time": stamp, "remote": environ.get("REMOTE_ADDR"), "method": environ.get("REQUEST_METHOD"),
              "path": environ.get("PATH_INFO"), "status": status, "duration_s": round(duration_s, 4)}
    if costs := environ.get("nanogpt.completion"):
        first = costs[0]
        ttfts = [c["ttft_s"] for c in costs if c["ttft_s"] is not None]
        # gunicorn writes this line when the body is sent or the client has gone, before the body's
        # close(); a completion still unfinished then was cut off by the client
        record |= {"model": first["model"], "prompt_tokens": first["prompt_tokens"],
                   "completion_tokens": sum(c["completion_tokens"] for c in costs), "ttft_s": min(ttfts, default=None),
                   "finish_reason": first["finish_reason"] or "cancelled"} | ({"n": len(costs)} if len(costs) > 1 else {})
    return json.dumps(record, ensure_ascii=True)


class AccessLogger(glogging.Logger):
    """gunicorn's logger with access_line() instead of the Apache format."""

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        status = getattr(resp, "status_code", None) or 0  # 0: no response was started
        self.access_log.info(access_line(environ, status, request_time.total_seconds()))
