"""Fault injection, set by flags at start and by ``POST /admin/faults`` at run time.

| field            | effect on generation requests (completions, chat, embeddings)            |
|------------------|--------------------------------------------------------------------------|
| fail_rate        | this fraction is answered `fail_status` (default 500) at once            |
| fail_status      | the status of those answers, e.g. 429 or 503 (4xx/5xx)                   |
| fail_retry_after | the Retry-After seconds those answers carry (null: no header)            |
| hang_rate        | this fraction is accepted and never answered (until the client leaves)   |
| slow_factor      | every engine step takes this many times longer                           |
| cut_after_chunks | the connection is closed after this many SSE chunks (a non-stream       |
|                  | request is closed without an answer); ``cut_rate`` of requests, default 1 |
| exit_after       | the process exits (status 1, like a crash) once this many requests have  |
|                  | been answered in full, cutting whatever is in flight                     |
| unhealthy_for    | /health answers 503 for this many seconds from now                       |
| drop_events      | this fraction of KV-event batches is not sent to subscribers (a lost      |
|                  | message: the sequence has a gap); they stay in the replay buffer         |
| drop_events_replay | with drop_events: the dropped batches leave the replay buffer too      |
|                  | (the gap cannot be replayed)                                             |

``POST /admin/faults`` takes a JSON object with any of these fields (null clears one) and
answers the whole state; ``{"clear": true}`` resets everything.  The draws come from a seeded
``random.Random`` so a run is reproducible.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Faults:
    fail_rate: float = 0.0
    fail_status: int = 500
    fail_retry_after: int | None = None
    hang_rate: float = 0.0
    slow_factor: float = 1.0
    cut_after_chunks: int | None = None
    cut_rate: float = 1.0
    exit_after: int | None = None
    unhealthy_until: float = 0.0  # time.monotonic() deadline
    drop_events: float = 0.0
    drop_events_replay: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def healthy(self) -> bool:
        return time.monotonic() >= self.unhealthy_until

    def draw_fail(self) -> bool:
        return self.fail_rate > 0 and self._rng.random() < self.fail_rate

    def failure_headers(self) -> dict[str, str]:
        return {} if self.fail_retry_after is None else {"Retry-After": str(self.fail_retry_after)}

    def draw_event_drop(self) -> bool:
        return self.drop_events > 0 and self._rng.random() < self.drop_events

    def draw_hang(self) -> bool:
        return self.hang_rate > 0 and self._rng.random() < self.hang_rate

    def draw_cut(self) -> int | None:
        if self.cut_after_chunks is None:
            return None
        return self.cut_after_chunks if self._rng.random() < self.cut_rate else None

    def update(self, body: dict[str, Any]) -> None:
        """Apply an /admin/faults body; raises ValueError on an unknown field or a bad value."""
        if body.get("clear"):
            fresh = Faults(seed=self.seed)
            for f in fields(Faults):
                setattr(self, f.name, getattr(fresh, f.name))
        defaults = Faults()
        for key, value in body.items():
            if key == "clear":
                continue
            if key == "unhealthy_for":
                self.unhealthy_until = time.monotonic() + float(value or 0)
                continue
            if key not in {f.name for f in fields(Faults)} or key == "unhealthy_until":
                raise ValueError(f"unknown fault {key!r}")
            if value is None:
                value = getattr(defaults, key)
            elif key in ("cut_after_chunks", "exit_after", "seed", "fail_retry_after"):
                value = int(value)
                if value < 0:
                    raise ValueError(f"{key} must be >= 0")
            elif key == "drop_events_replay":
                value = bool(value)
            elif key == "fail_status":
                value = int(value)
                if not 400 <= value <= 599:
                    raise ValueError("fail_status must be a 4xx or 5xx status")
            else:
                value = float(value)
                fraction = key.endswith("_rate") or key == "drop_events"
                if value < 0 or (fraction and value > 1) or (key == "slow_factor" and value == 0):
                    raise ValueError(f"{key} out of range: {value}")
            setattr(self, key, value)
            if key == "seed":
                self._rng = random.Random(value)

    def state(self) -> dict[str, Any]:
        out = asdict(self)
        out["unhealthy_for"] = max(0.0, self.unhealthy_until - time.monotonic())
        del out["unhealthy_until"]
        return out
