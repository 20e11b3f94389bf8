"""The process's logging: plain (or JSON) messages to stderr, the access log on or off.

Called once by the CLI (router/cli.py); the access log's own lines pass through as written
(router/observability/access_log.py).
"""

from __future__ import annotations

import logging
import sys

import orjson

from router.observability.access_log import access_log


def setup_logging(level: str = "info", fmt: str = "json", access: bool = True) -> None:
    """Root logging for the CLI: plain messages to stderr; the access log as given."""
    root = logging.getLogger()
    if not any(getattr(h, "_router", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._router = True  # type: ignore[attr-defined]
        if fmt == "json":
            handler.setFormatter(_JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())
    access_log.setLevel(logging.INFO if access else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    """Access-log lines are already JSON and pass through; other records become JSON."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_log.name:
            return record.getMessage()
        data = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def announce(message: str, level: int = logging.INFO) -> None:
    """A line that reaches stderr whatever the log level (the address a launcher or a test
    waits for, an error that stops the router), in the log's own format: a JSON log is JSON
    on every line."""
    record = logging.LogRecord("router", level, __file__, 0, message, None, None)
    handler = next((h for h in logging.getLogger().handlers if getattr(h, "_router", False)), None)
    print(handler.format(record) if handler is not None else message, file=sys.stderr, flush=True)
