"""The access log: what happened to one request (`RequestRecord`, filled in along its way),
written once at its end as one line on the ``router.access`` logger: JSON (one object per
line) or a compact ``key=value`` text line whose client-chosen strings cannot forge a line.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

access_log = logging.getLogger("router.access")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request: filled in along the way, logged once at the end."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    stream: bool = False
    replica: str | None = None
    attempts: int = 0
    policy: str | None = None
    why: dict[str, Any] | None = None
    status: int = 0
    ttfb: float | None = None  # seconds, first body byte from the replica
    error: str | None = None
    client: str | None = None
    client_gone: bool = False  # the client went away before the response was complete
    client_name: str | None = None  # the API key's name (never the key), or "anonymous"
    queued_s: float | None = None  # seconds waited in the admission queue
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens of the answer
    predicted_tokens: int | None = None  # what the router predicted cached on that replica
    admitted: bool = False  # passed admission (holds a slot the queue hands on)
    slot_released: bool = False  # ... handed on already (at its first byte: the engine took it)
    # Disaggregated serving (flows.Disaggregated): the prefill hop, before the decode hop's
    # fields above (replica, attempts, ttfb) are filled in.
    prefill_replica: str | None = None
    prefill_attempts: int = 0
    prefill_s: float | None = None  # the prefill hop, start to its whole answer

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def as_dict(self, duration: float) -> dict[str, Any]:
        return {
            "ts": round(time.time(), 3),
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "stream": self.stream,
            "replica": self.replica,
            "attempts": self.attempts,
            "policy": self.policy,
            "why": self.why,
            "status": self.status,
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "error": self.error,
            "client": self.client,
            "key": self.client_name,
            "queued_ms": None if self.queued_s is None else round(self.queued_s * 1000, 3),
            "cached_tokens": self.cached_tokens,
            "predicted_cached_tokens": self.predicted_tokens,
            "prefill_replica": self.prefill_replica,
            "prefill_attempts": self.prefill_attempts or None,
            "prefill_ms": None if self.prefill_s is None else round(self.prefill_s * 1000, 3),
        }


def _text_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    text = str(value)
    # Client-chosen strings (model, request id) are quoted and escaped unless plainly safe,
    # so no byte of theirs can break or forge a log line.
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


def write_access_log(record: RequestRecord, duration: float, fmt: str = "json") -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    data = record.as_dict(duration)
    if fmt == "json":  # the keys every other JSON log line has, then the request's
        line = orjson.dumps({"ts": data.pop("ts"), "level": "info", "logger": access_log.name, **data},
                            default=str).decode()
    else:
        line = " ".join(f"{k}={_text_value(v)}" for k, v in data.items() if v is not None)
    access_log.info(line)
